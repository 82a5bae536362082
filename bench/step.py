"""Section `step`: our pretrain stage's training step (PretrainStage: CLIP loss + mask regularization on
1/16 of the batch, LAMB clipping inside its step (our compiled FusedLamb under `model.compile`, else timm's),
the recipe's precision, `model.compile`).

Drivers (each a row of the report):
  lightning       a Lightning Trainer over a synthetic in-memory batch already on the device, as the recipe
                  builds it (TensorBoard logger every `train.log_every_n_steps`) but without the progress
                  bar, checkpointing and eval callbacks; host syncs are counted over one whole log interval,
                  so the log step's (Lightning reads the logged values there) is told apart from the others;
  loop            a minimal loop calling the same methods (training_step under the same autocast,
                  loss.backward(), clip_grad_norm_, LAMB step, zero_grad): the difference is Lightning's cost;
  lightning-pbar  as `lightning` with Lightning's default TQDM progress bar (refresh every step), as the
                  recipe runs today with trainer.progress_bar=true.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional

import torch


from bench.common import (PeakMemory, Window, autocast, compile_counters, error_record, free_memory, rss_bytes,
                          sync_watch, synchronize, synthetic_batch, time_loop)

DRIVERS = ("lightning", "loop", "lightning-pbar")


def recipe_overrides(preset: str, batch: int, resolution: int, precision: str, compile_: bool) -> list[str]:
    """One phase at `resolution` and `batch` (no progressive schedule), an endless run."""
    return [f"model={preset}", f"model.compile={'true' if compile_ else 'false'}", "train.phases=[]",
            f"train.batch_size={batch}", f"data.image_size={resolution}", "train.total_samples=1000000000000",
            f"trainer.precision={precision}", "trainer.progress_bar=false"]


class _Batches:
    """The same device-resident batch, `n` times (Lightning moves nothing: it is already there)."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch

    def __len__(self) -> int:
        return self.n


def _make_timer_callback(device: torch.device, warmup: int, steps: int, baseline_rss: int, watch: int):
    import lightning as L

    class StepTimer(L.Callback):
        """First step (compile), warmup, then `steps` steps timed as one window with CUDA events; then `watch`
        steps with the host-sync detector, counted per step. Only the window ends synchronise."""

        def __init__(self):
            self.out: dict[str, Any] = {}
            self._t0 = 0.0
            self._stack: Optional[ExitStack] = None
            self._found: list = []
            self._marks: list[int] = []  # len(self._found) at each watched step's start
            self._graphs = 0
            self.mem = PeakMemory(device, baseline_rss)
            self.window = Window(device)

        def on_train_start(self, trainer, pl_module):
            synchronize(device)
            self._t0 = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                synchronize(device)
                self.out["warmup_s"] = time.perf_counter() - self._t0
                self._graphs = compile_counters().get("unique_graphs", 0)
                self.mem.start()
                self.window.start()
            elif batch_idx == warmup + steps and watch and device.type == "cuda":
                self._stack = ExitStack()
                self._found = self._stack.enter_context(sync_watch(device))
            if self._stack is not None:
                self._marks.append(len(self._found))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                synchronize(device)
                self.out["first_step_s"] = time.perf_counter() - self._t0
            if batch_idx == warmup + steps - 1:
                elapsed = self.window.stop()
                self.out.update(self.mem.stop())
                self.out["timed_steps"] = steps
                self.out["step_s"] = elapsed / steps
                self.out["recompiles_in_timed_steps"] = compile_counters().get("unique_graphs", 0) - self._graphs
            if batch_idx == warmup + steps + watch - 1 and self._stack is not None:
                self._stack.close()
                self._stack = None
                synchronize(device)
                per_step = [b - a for a, b in zip(self._marks, self._marks[1:] + [len(self._found)])]
                self.out["host_syncs_by_step"] = per_step
                self.out["host_syncs_per_step"] = sorted(per_step)[len(per_step) // 2]  # the typical (median) step
                self.out["host_syncs_per_log_interval"] = len(self._found) * trainer.log_every_n_steps / watch
                self.out["host_sync_sites"] = sorted(set(self._found))[:8]

    return StepTimer()


def _quiet_progress_bar():
    """Lightning's TQDM bar (refresh every step, so it reads the logged metrics every step) writing to
    /dev/null."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    class QuietBar(TQDMProgressBar):
        def init_train_tqdm(self):
            return Tqdm(desc=self.train_description, leave=True, dynamic_ncols=True, smoothing=0,
                        file=open(os.devnull, "w"), bar_format=self.BAR_FORMAT)

    return QuietBar(refresh_rate=1)


def _logger(save_dir: str):
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=save_dir, name="tb", version="", default_hp_metric=False)
    except Exception:  # tensorboard missing: the CSV logger does the same per-interval conversion
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=save_dir, name="csv", version="")


def run_lightning(stage, cfg, batch: dict, device: torch.device, precision: str, warmup: int, steps: int,
                  baseline_rss: int, progress_bar: bool = False) -> dict:
    import lightning as L

    watch = cfg.train.log_every_n_steps  # one whole log interval: its log step and the steps between
    timer = _make_timer_callback(device, warmup, steps, baseline_rss, watch)
    callbacks = [timer] + ([_quiet_progress_bar()] if progress_bar else [])
    total = warmup + steps + (watch if device.type == "cuda" else 0)
    with tempfile.TemporaryDirectory(prefix="pe-bench-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*Precision bf16-mixed is not supported by the model summary.*")
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
            max_epochs=-1, max_steps=total,
            # gradient clipping: the stage's own configure_gradient_clipping, as in a real run
            logger=_logger(tmp), callbacks=callbacks, enable_checkpointing=False,
            log_every_n_steps=cfg.train.log_every_n_steps, enable_progress_bar=progress_bar,
            enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
            default_root_dir=tmp)
        trainer.fit(stage, train_dataloaders=_Batches(batch, total))
    if "step_s" not in timer.out:
        raise RuntimeError(f"the Trainer stopped after {trainer.global_step} steps, before the timed window ended")
    return timer.out


class LoopTrainer:
    """The few Trainer attributes the stage's own hooks read, for the minimal loop. `barebones=True` makes
    the stage's self.log() calls return at once (Lightning's contract for a bare-bones Trainer)."""

    barebones = True
    world_size = 1
    global_rank = 0
    local_rank = 0
    node_rank = 0
    num_devices = 1
    should_stop = False
    log_every_n_steps = 50

    def __init__(self, optimizer):
        self.optimizers = [optimizer]
        self.global_step = 0


@contextmanager
def loop_step(stage, batch: dict, device: torch.device, precision: str) -> Iterator[Callable[[int], None]]:
    """`step(i)`: our training step without Lightning: the stage's own hooks and training_step (under the same
    autocast), loss.backward(), clip_grad_norm_ where the Trainer would clip (not for LAMB), the optimizer step
    (marked `pe_optimizer_step` for the profiler), zero_grad. The stage gets a stand-in Trainer meanwhile."""
    from torch.profiler import record_function

    stage.to(device)
    stage.train()
    optimizer = stage.configure_optimizers()
    params = [p for p in stage.parameters() if p.requires_grad]
    o = stage.cfg.optim
    clip = o.grad_clip if o.name != "lamb" else None  # as PEStage.configure_gradient_clipping: LAMB clips itself
    trainer = LoopTrainer(optimizer)
    saved, stage._trainer = stage._trainer, trainer

    def step(i: int) -> None:
        trainer.global_step = i
        stage.on_train_batch_start(batch, i)
        with autocast(device, precision):
            loss = stage.training_step(batch, i)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        with record_function("pe_optimizer_step"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stage.on_train_batch_end(loss, batch, i)

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            stage.on_train_start()
            yield step
    finally:
        stage._trainer = saved
        del optimizer


def run_loop(stage, batch: dict, device: torch.device, precision: str, warmup: int, steps: int,
             baseline_rss: int) -> dict:
    """The minimal loop (`loop_step`) timed by `time_loop`."""
    with loop_step(stage, batch, device, precision) as step:
        return time_loop(step, device, warmup, steps, baseline_rss)


def lamb_path(stage, device: torch.device) -> str:
    """Which LAMB implementation the optimizer's step takes on this device (timm: foreach or per tensor)."""
    try:
        from timm.optim._helpers import _resolve_foreach

        params = [p for p in stage.parameters() if p.requires_grad]
        probe = [p.detach()[:0] if p.dim() else p.detach() for p in params[:2]]
        probe = [p.to(device) for p in probe]
        return "foreach (multi-tensor)" if _resolve_foreach(None, False, 1e-3, probe) else "per-tensor loop"
    except Exception as err:  # an older timm: no foreach path at all
        return f"unknown ({type(err).__name__})"


LABELS = {"lightning": "ours: Lightning Trainer", "loop": "ours: minimal loop",
          "lightning-pbar": "ours: Lightning + TQDM bar (refresh 1)"}


class StageUnderTest:
    """Our PretrainStage built from the recipe, its synthetic batch and its FLOPs; kept by the context so the
    `variants` section reuses the compiled graphs."""

    def __init__(self, ctx):
        from pe_lightning.stages import load_stage_recipe
        from pe_lightning.perf import tower_training_flops
        from pe_lightning.stages.pretrain import PretrainStage

        self.device = device = ctx.device
        self.overrides = recipe_overrides(ctx.preset, ctx.batch, ctx.resolution, ctx.precision,
                                          ctx.compile) + ctx.overrides
        self.cfg = cfg = load_stage_recipe("pretrain", self.overrides)
        flops = tower_training_flops(cfg.model.preset, ctx.resolution, dict(cfg.model.vision), dict(cfg.model.text))
        self.flops = flops
        self.model_flops = flops["vision"] + flops["text"]
        mask_reg = cfg.pretrain.mask_reg
        self.mask_extra = flops["vision"] * mask_reg.batch_fraction if mask_reg.enabled else 0.0
        import lightning.pytorch.loggers  # noqa: F401  (imported before the RSS baseline is read)
        free_memory(device)
        self.baseline = rss_bytes()
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        self.stage = PretrainStage(cfg)
        self.build_s = time.perf_counter() - t0
        self.batch = synthetic_batch(ctx.batch, ctx.resolution, self.stage.model.context_length, device,
                                     seed=cfg.seed)
        self.warmed = False

    def section(self, ctx) -> dict:
        cfg = self.cfg
        return {
            "status": "ok", "recipe_overrides": self.overrides,
            "preset": cfg.model.preset, "batch": ctx.batch, "resolution": ctx.resolution,
            "precision": ctx.precision, "compile": bool(cfg.model.compile), "optimizer": cfg.optim.name,
            "grad_clip": cfg.optim.grad_clip,
            "mask_reg": {"enabled": bool(cfg.pretrain.mask_reg.enabled), "batch_fraction": cfg.pretrain.mask_reg.batch_fraction,
                         "mask_ratio": cfg.pretrain.mask_reg.mask_ratio},
            "flops_per_sample": self.model_flops, "flops_per_sample_vision": self.flops["vision"],
            "flops_per_sample_text": self.flops["text"],
            "flops_per_sample_incl_mask_reg": self.model_flops + self.mask_extra,
            "build_s": self.build_s, "params_m": sum(p.numel() for p in self.stage.parameters()) / 1e6,
            "lamb_path": ("our FusedLamb, compiled" if cfg.optim.compile and cfg.optim.name == "lamb"
                          else lamb_path(self.stage, self.device)), "rows": [],
        }

    def measure(self, ctx, label: str, driver: str, run, mask_extra: Optional[float] = None) -> dict:
        """One report row: `run(warmup)` -> timing dict; the first measured row gets the full warmup."""
        row: dict[str, Any] = {"name": label, "driver": driver}
        print(f"[bench] {label} ...", flush=True)
        warmup = ctx.warmup if not self.warmed else max(2, ctx.warmup // 3)
        mask_extra = self.mask_extra if mask_extra is None else mask_extra
        try:
            res = run(warmup)
            self.warmed = True
            row["warmup_steps"] = warmup
            row.update(res)
            row["images_per_s"] = ctx.batch / res["step_s"]
            row["step_ms"] = res["step_s"] * 1000
            if ctx.peak_flops:
                row["mfu"] = self.model_flops * row["images_per_s"] / ctx.peak_flops
                row["mfu_incl_mask_reg"] = (self.model_flops + mask_extra) * row["images_per_s"] / ctx.peak_flops
            row["status"] = "ok"
        except Exception as err:  # one row failing leaves the others
            row.update(error_record(err))
            print(f"[bench] {label} FAILED: {row['error']}", flush=True)
        return row

    def park(self) -> None:
        """Move the stage off the device between sections (it would count in the next section's peak)."""
        self.stage.cpu()
        free_memory(self.device)


def bench_step(ctx) -> dict:
    """Build the stage from the recipe and run each driver; returns the section record."""
    sut = StageUnderTest(ctx)
    section = sut.section(ctx)
    ctx.publish(section)
    stage, cfg, batch, device = sut.stage, sut.cfg, sut.batch, sut.device
    for driver in ctx.drivers:
        if driver == "loop":
            run = lambda w: run_loop(stage, batch, device, ctx.precision, w, ctx.steps, sut.baseline)  # noqa: E731
        elif driver in ("lightning", "lightning-pbar"):
            run = lambda w, d=driver: run_lightning(stage, cfg, batch, device, ctx.precision, w, ctx.steps,  # noqa: E731
                                                    sut.baseline, progress_bar=(d == "lightning-pbar"))
        else:
            section["rows"].append({"name": driver, "driver": driver, "status": "failed",
                                    "error": f"unknown driver {driver!r}; valid: {', '.join(DRIVERS)}"})
            continue
        section["rows"].append(sut.measure(ctx, LABELS[driver], driver, run))
        ctx.checkpoint()
    section["compile_counters"] = compile_counters()
    if ctx.keep_stage:
        sut.park()
        ctx.stage_under_test = sut
    else:
        del sut, stage, batch
        free_memory(device)
    return section
