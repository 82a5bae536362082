"""Atomic `last.ckpt` every N steps and on SIGTERM/SIGINT, so a killed or preempted stage resumes.

Recipe: `callbacks: [{name: checkpoint, args: {every_n_steps: 50}}]` (default: trainer.checkpoint_every_n_steps).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pe_lightning.io import crash_point, fsync_dir, write_text_atomic
from pe_lightning.sharding import is_sharded


class AtomicCheckpoint(L.Callback):
    """Writes checkpoints/last.ckpt through a temporary file and `os.replace` (under FSDP: `last.ckpt` is a
    symlink to a sharded checkpoint folder, `last-<step>-<id>.ckpt/`, swapped the same way).

    A kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
    SIGTERM / SIGINT (a cluster's preemption, Ctrl-C) make the stage save at the end of the current step
    and stop; the stage manager then reports where it stopped, and the same command resumes.
    """

    def __init__(self, cfg=None, stage_root: str | Path = ".", every_n_steps: int | None = None,
                 signal_check_every: int = 10):
        self.every_n_steps = every_n_steps or (cfg.trainer.checkpoint_every_n_steps if cfg else 50)
        self.signal_check_every = signal_check_every  # under DDP the stop decision costs one all-reduce
        self.root = Path(stage_root)
        self.path = self.root / "checkpoints" / "last.ckpt"
        self._signalled = False
        self._saved_step = -1
        self._previous_handlers: dict[int, object] = {}

    # ----- signals -----
    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they were
                pass

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning turns SIGTERM into SIGTERMException between steps (and Ctrl-C, when our handler is not
        # installed, into KeyboardInterrupt): the state is that of a finished step, so save it.
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.global_step > self._saved_step:
            self.save(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        if trainer.world_size == 1:
            return self._signalled
        if trainer.global_step % self.signal_check_every:
            return False
        return trainer.strategy.reduce_boolean_decision(self._signalled, all=False)

    # ----- saving -----
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self._stop_requested(trainer)
        finished = getattr(pl_module, "finished", False)
        if stop or finished or trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, pl_module)
        if stop:
            trainer.should_stop = True

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sharded = is_sharded(trainer)
        # Sharded (trainer.strategy=fsdp): each rank writes its slice into a fresh folder, published by swapping
        # the `last.ckpt` symlink (os.replace of a link is atomic; of a non-empty folder it is impossible).
        tmp = self.path.with_name(f"last-{trainer.global_step}-{uuid.uuid4().hex[:8]}.ckpt" if sharded
                                  else "last.ckpt.tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier()
        trainer.save_checkpoint(tmp, weights_only=False)  # collective under FSDP; rank 0's path is everyone's
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            if sharded:
                self._publish_folder(tmp)
            else:
                self._publish_file(tmp)
            progress = {"samples_seen": int(getattr(pl_module, "samples_seen", 0)), "step": trainer.global_step}
            write_text_atomic(self.root / "progress.json", json.dumps(progress))
        trainer.strategy.barrier()

    def _publish_file(self, tmp: Path) -> None:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        crash_point()
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def _publish_folder(self, folder: Path) -> None:
        """Point `last.ckpt` at a complete sharded checkpoint folder, then delete the folders it replaced (and
        any a crash left half written)."""
        for file in folder.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)
        link = self.path.with_name("last.ckpt.link")
        link.unlink(missing_ok=True)
        link.symlink_to(folder.name)
        crash_point()
        os.replace(link, self.path)
        fsync_dir(self.path.parent)
        for old in self.path.parent.glob("last-*.ckpt"):
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
