"""Images/s and model FLOPs utilization (MFU), logged every `train.log_every_n_steps` steps.

MFU = model FLOPs per second (counted with torch.utils.flop_counter on a meta-device copy of the model at
the current resolution) / the dense matmul peak measured on the same device at the start of the run.
Timing reads the clock only at log steps, so it adds no host synchronisation to other steps.
"""

from __future__ import annotations

import time

import lightning as L

from pe_lightning.perf import matmul_peak_flops, training_flops_per_sample


class ThroughputMonitor(L.Callback):
    def __init__(self, cfg=None, measure_peak: bool = True):
        self.cfg = cfg
        self.measure_peak = measure_peak
        self.peak_flops = 0.0
        self._window_start = 0.0
        self._window_samples = 0
        self._window_flops = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.measure_peak:
            self.peak_flops = matmul_peak_flops(pl_module.device)
        self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        samples = pl_module.batch_samples(batch) * trainer.world_size
        resolution = pl_module.phase().resolution
        model = self.cfg.model
        flops = training_flops_per_sample(model.preset, resolution, dict(model.vision), dict(model.text))
        self._window_samples += samples
        self._window_flops += flops * samples
        if trainer.global_step % trainer.log_every_n_steps:
            return
        elapsed = time.perf_counter() - self._window_start
        rate = self._window_samples / elapsed
        pl_module.log("perf/images_per_sec", rate, prog_bar=True)
        if self.peak_flops:
            # per-device utilisation: FLOPs of all ranks / (peak of one device * ranks)
            pl_module.log("perf/mfu", self._window_flops / elapsed / (self.peak_flops * trainer.world_size))
        self._window_start, self._window_samples, self._window_flops = time.perf_counter(), 0, 0.0
