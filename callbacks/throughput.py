"""Images/s and model FLOPs utilization (MFU), logged every `train.log_every_n_steps` steps.

MFU = model FLOPs per second (the stage's `flops_per_sample(resolution)`: torch.utils.flop_counter on a
meta-device copy of its model) / the dense matmul peak measured on the same device at the start of the run.
Timing reads the clock only at log steps, after waiting for the device there (one host synchronisation per
log interval, none on other steps), so the rate is the device's real rate, not how fast Python queued work.
"""

from __future__ import annotations

import time

import lightning as L

from pe_lightning.perf import matmul_peak_flops, synchronize


class ThroughputMonitor(L.Callback):
    def __init__(self, measure_peak: bool = True):
        self.measure_peak = measure_peak
        self.peak_flops = 0.0
        self._window_start = 0.0
        self._window_samples = 0
        self._window_flops = 0.0
        self._flops_at: dict[int, float] = {}  # resolution -> FLOPs per sample

    def _flops(self, pl_module: L.LightningModule, resolution: int) -> float:
        if resolution not in self._flops_at:
            self._flops_at[resolution] = pl_module.flops_per_sample(resolution)
        return self._flops_at[resolution]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.measure_peak:
            self.peak_flops = matmul_peak_flops(pl_module.device)
        synchronize(pl_module.device)
        self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        samples = pl_module.batch_samples(batch) * trainer.world_size
        self._window_samples += samples
        self._window_flops += self._flops(pl_module, pl_module.current_phase.resolution) * samples  # this batch's phase
        if trainer.global_step % trainer.log_every_n_steps:
            return
        synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._window_start
        rate = self._window_samples / elapsed
        pl_module.log("perf/images_per_sec", rate, prog_bar=True)
        if self.peak_flops:
            # per-device utilisation: FLOPs of all ranks / (peak of one device * ranks)
            pl_module.log("perf/mfu", self._window_flops / elapsed / (self.peak_flops * trainer.world_size))
        self._window_start, self._window_samples, self._window_flops = time.perf_counter(), 0, 0.0
