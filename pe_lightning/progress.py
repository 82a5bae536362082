"""Training progress over the run's own steps, not Lightning's epochs.

A stage's data stream is endless and its end is `train.total_samples`, so Lightning's bar (one "epoch" per
pass over the shards, reset at each) shows the wrong total and ETA. Here:
- `LockProgress`: the step and the run's step count, written into the stage's lock for `status`.
- `RunProgressBar` (stdout is a terminal): Lightning's tqdm bar, spanning the whole run (its steps from
  the stage's phase schedule, starting at the checkpoint's step on a resume), so its ETA is the run's.
- `ProgressLines` (stdout is a file, a pipe, or a terminal with no size, where a bar shows nothing): a
  plain log line every `every` steps with the step, samples, loss, rate and ETA.
Both log a line when the phase (resolution, batch) changes. Our log lines go through tqdm (cli.py), so
they land on their own lines above the bar.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

if TYPE_CHECKING:
    from pe_lightning.runlock import StageLock

log = logging.getLogger("pe_lightning")


def run_steps(trainer: L.Trainer, module: L.LightningModule) -> int:
    """The stage's optimizer steps from 0 to its end (its phase schedule's batches, over accumulation)."""
    batches = module.schedule.steps
    return -(-batches // max(1, trainer.accumulate_grad_batches))


def stdout_shows_a_bar() -> bool:
    """A bar needs a terminal with a size: under a pty of 0 rows or columns tqdm draws nothing at all."""
    try:
        return sys.stdout.isatty() and min(os.get_terminal_size(sys.stdout.fileno())) > 0
    except (OSError, ValueError):
        return False


def progress_callback(refresh_steps: int) -> ProgressBar:
    """The bar on a terminal, plain lines every 10 refreshes elsewhere."""
    return RunProgressBar(refresh_rate=refresh_steps) if stdout_shows_a_bar() else ProgressLines(10 * refresh_steps)


class _PhaseLines:
    """A log line at the start of each phase (resolution, batch size), and at the start of a run."""

    _phase: Any = None

    def log_phase(self, module: L.LightningModule) -> None:
        schedule = getattr(module, "schedule", None)
        if schedule is None:
            return
        index, phase = schedule.at(module.samples_seen)
        if phase != self._phase:
            self._phase = phase
            log.info("phase %d of %d: %d px, batch %d, until %s samples (at %s)", index + 1, len(schedule),
                     phase.resolution, phase.batch_size, f"{phase.until_samples:,}", f"{module.samples_seen:,}")


class RunProgressBar(_PhaseLines, TQDMProgressBar):
    """Lightning's tqdm bar over the run's steps (see the module docstring)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=run_steps(trainer, pl_module))
        bar.initial = bar.n = trainer.global_step  # a resumed run: the rate and ETA count this process's steps
        bar.set_description(getattr(pl_module, "name", "") or "train")
        if self.is_enabled:  # Lightning disables the bar on every rank but 0: one phase line per run
            self.log_phase(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Nothing: a pass over the shards is no boundary of the run (Lightning resets its bar here)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, n = self.train_progress_bar, trainer.global_step
        if self.is_enabled:
            self.log_phase(pl_module)
        if self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: the bar stays open across passes over the shards."""


class ProgressLines(_PhaseLines, ProgressBar):
    """A plain line every `every` steps, for logs and pipes (see the module docstring)."""

    def __init__(self, every: int = 100):
        super().__init__()
        self.every = max(1, int(every))
        self._enabled = True
        self._start: tuple[float, int] = (0.0, 0)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)
        if self._enabled:
            self.log_phase(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        self.log_phase(pl_module)
        step, total = trainer.global_step, run_steps(trainer, pl_module)
        if step % self.every == 0 or step == total:
            log.info("%s", self.line(step, total, pl_module.samples_seen, self.get_metrics(trainer, pl_module)))

    def line(self, step: int, total: int, samples: int, metrics: dict) -> str:
        started, first = self._start
        rate = (step - first) / max(time.monotonic() - started, 1e-9)
        eta = (total - step) / rate if rate > 0 else float("nan")
        loss = metrics.get("train/loss")
        return (f"step {step:,} of {total:,} ({100 * step / max(total, 1):.0f}%), {samples:,} samples"
                + (f", loss {float(loss):.3f}" if loss is not None else "")
                + f", {rate:.2f} steps/s, ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


class LockProgress(L.Callback):
    """Writes the trainer's step and the run's step count into the stage's lock (runlock.py) every `every`
    steps, for `status`."""

    def __init__(self, lock: "StageLock", every: int = 1):
        self.lock, self.every = lock, max(1, int(every))

    def on_train_start(self, trainer, pl_module) -> None:  # a resumed run starts at its checkpoint's step
        if getattr(pl_module, "schedule", None) is not None:
            self.lock.total_steps = run_steps(trainer, pl_module)
        self.lock.update(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.lock.update(trainer.global_step)
