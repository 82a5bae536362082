"""What every stage shares: the model, the optimizer and schedule, samples seen, seeding and export."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from pe_lightning.config import RecipeError
from pe_lightning.models import build_model
from pe_lightning.models.checkpoint import export_checkpoint
from pe_lightning.stages.optim import WarmupCosine, build_optimizer, param_groups, set_lr
from pe_lightning.stages.phases import Phase, PhaseSchedule


class PEStage(L.LightningModule):
    """Base LightningModule of every stage.

    The learning rate and the progressive-resolution phase are pure functions of `samples_seen`, and every
    step reseeds torch from (seed, step, rank): a run resumed from a checkpoint therefore continues exactly
    as the uninterrupted run would have.
    """

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"recipe": OmegaConf.to_container(cfg, resolve=True)})
        self.model = build_model(cfg.model.preset, vision=dict(cfg.model.vision), text=dict(cfg.model.text))
        self.samples_seen = 0  # global samples trained on (all ranks)
        self.train_seconds = 0.0  # wall time spent in fit, summed over resumes
        self.metrics: dict[str, Any] = {}  # headline metrics, written to export/metrics.json
        self.schedule = self._build_phase_schedule()
        self.lr_schedule = WarmupCosine(cfg.optim.lr, cfg.optim.warmup_samples, cfg.train.total_samples,
                                        cfg.optim.min_lr_ratio)
        self._fit_started_at = 0.0
        self.current_phase = self.phase()  # the phase of the batch being trained (set at batch start)
        if cfg.model.compile:
            self.compile_towers()

    def compile_towers(self) -> None:
        """torch.compile each tower in place (state-dict keys unchanged). Shapes change only at phase
        boundaries and for the masked sub-batch, so a run compiles a handful of graphs, not one per step."""
        self.model.visual.compile(dynamic=False)
        self.model.transformer.compile(dynamic=False)

    # ----- schedule over samples seen -----
    def _build_phase_schedule(self, world_size: int = 1) -> PhaseSchedule:
        train = self.cfg.train
        phases = [Phase(p.until_samples, p.resolution, p.batch_size) for p in train.phases]
        if not phases:
            phases = [Phase(train.total_samples, self.cfg.data.image_size, train.batch_size)]
        return PhaseSchedule(phases, train.total_samples, patch_size=self.model.visual.patch_size,
                             chunk_size=self.cfg.data.chunk_size, world_size=world_size)

    def setup(self, stage: str) -> None:
        """The number of processes is known now: every phase's global batch must split into whole data chunks
        on every rank. Checked here, on all ranks, rather than at the first batch of the phase that breaks."""
        world = self.trainer.world_size
        if world > 1:
            try:
                self.schedule = self._build_phase_schedule(world)
            except ValueError as err:
                raise RecipeError(
                    f"train.phases over {world} processes: {err}. Batch sizes are global (summed over ranks): "
                    f"make each a multiple of {world} x data.chunk_size, or lower data.chunk_size") from None

    def phase(self) -> Phase:
        return self.schedule.at(self.samples_seen)[1]

    def local_batch_size(self, samples_consumed_local: int) -> int:
        """Batch size per rank for the batch that starts at this rank's stream position."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.schedule.at(samples_consumed_local * world)[1].local_batch_size(world)

    @property
    def finished(self) -> bool:
        return self.samples_seen >= self.cfg.train.total_samples

    # ----- optimizer -----
    def configure_optimizers(self):
        o = self.cfg.optim
        self._check_optimizer_fits_strategy()
        groups = param_groups(self.trainable_module(), o.weight_decay)
        return build_optimizer(groups, o.name, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps,
                               grad_clip=o.grad_clip, compile=o.compile)

    def _check_optimizer_fits_strategy(self) -> None:
        """LAMB's trust ratio and its clipping need the norm of each whole weight and of the whole gradient;
        FSDP shards both over ranks, so every rank would use a shard's norm: a silently different recipe."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = getattr(self._trainer, "strategy", None)
        if self.cfg.optim.name == "lamb" and isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise RecipeError(
                f"optim.name=lamb does not run under trainer.strategy={self.cfg.trainer.strategy}: LAMB scales "
                "each weight's step by ||weight|| / ||update|| and FSDP holds only a shard of each weight per "
                "rank. Use trainer.strategy=ddp (PE-Core-G, 2.4B parameters with its text tower, needs ~36 GiB per "
                "GPU for fp32 weights, gradients and LAMB state), or optim.name=adamw with FSDP")

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    # ----- per-step bookkeeping -----
    def on_train_start(self) -> None:
        self._fit_started_at = time.monotonic() - self.train_seconds

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.global_step * 7919 + self.global_rank)
        self.current_phase = self.phase()
        lr = self.lr_schedule(self.samples_seen)
        for optimizer in self.trainer.optimizers:
            set_lr(optimizer, lr)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.step(batch, self.current_phase)
        # Counted here, not in on_train_batch_end: Lightning runs the callbacks' on_train_batch_end (the
        # checkpoint among them) before the module's, and a checkpoint must hold the count of this batch.
        self.samples_seen += self.batch_samples(batch) * self.trainer.world_size
        return loss

    def step(self, batch: Any, phase: Phase) -> torch.Tensor:
        """One stage's loss on one batch (subclasses)."""
        raise NotImplementedError

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        grad_norm = getattr(self.trainer.optimizers[0], "last_grad_norm", None) if self.trainer.optimizers else None
        if grad_norm is not None:  # a device tensor: logging it costs no sync until the log step reads it
            self.log("train/grad_norm", grad_norm)
        self.train_seconds = time.monotonic() - self._fit_started_at
        if self.finished:
            self.trainer.should_stop = True

    def log_scalars(self, values: dict[str, float]) -> None:
        """Log host-side numbers as CPU tensors: Lightning copies a Python float to the GPU, a blocking copy
        that would stall the step until the GPU caught up."""
        for name, value in values.items():
            self.log(name, torch.tensor(float(value), dtype=torch.float64), prog_bar=name == "train/batch_size")

    def batch_samples(self, batch: dict) -> int:
        return next(iter(batch.values())).shape[0]

    # ----- checkpoint state beyond Lightning's -----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["pe_state"] = {"samples_seen": self.samples_seen, "train_seconds": self.train_seconds,
                                  "metrics": self.metrics}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("pe_state", {})
        self.samples_seen = int(state.get("samples_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.metrics = dict(state.get("metrics", {}))

    # ----- export -----
    def export(self, out_dir: Path) -> None:
        """Write this stage's weights in Meta's layout into `out_dir` (the manager makes it atomic)."""
        export_checkpoint(self.model, out_dir / "model.pt")
