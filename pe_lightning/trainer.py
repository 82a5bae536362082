"""How a stage is run by Lightning: build the stage, build the Trainer, `fit(stage, stage.datamodule())`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from pe_lightning.callback_loader import build_callbacks
from pe_lightning.progress import progress_callback
from pe_lightning.sharding import build_strategy
from pe_lightning.stages.base import PEStage

log = logging.getLogger("pe_lightning")


def resolve_precision(requested: str) -> str:
    """`auto`: bf16 mixed precision where a GPU is present, full fp32 on CPU."""
    if requested != "auto":
        return requested
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def build_trainer(cfg: DictConfig, stage_root: Path, callbacks: list[L.Callback]) -> L.Trainer:
    t = cfg.trainer
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.progress_bar:  # refreshed once per log interval: each refresh reads the metrics (a GPU sync)
        callbacks = [*callbacks, progress_callback(max(1, cfg.train.log_every_n_steps))]
    logger = TensorBoardLogger(save_dir=str(stage_root), name="tb", version="", default_hp_metric=False)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t.strategy),  # fsdp: FSDP2 (sharding.py), on CPU too
        precision=resolve_precision(t.precision),
        max_epochs=-1,  # a stage ends when it has seen train.total_samples (the stage stops the trainer)
        max_steps=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,  # clipping: PEStage.configure_gradient_clipping
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,  # the `checkpoint` callback writes last.ckpt atomically
        log_every_n_steps=cfg.train.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data pipeline splits shards by rank and worker itself
        default_root_dir=str(stage_root),
    )


def fit_stage(stage: PEStage, stage_root: Path, ckpt: Optional[Path],
              extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """Train `stage` in `stage_root`, resuming from `ckpt` if given. `extra_callbacks`: the stage manager's own
    (the run lock's progress), beside the recipe's."""
    callbacks = [*build_callbacks(stage.cfg, stage_root), *extra_callbacks]
    trainer = build_trainer(stage.cfg, stage_root, callbacks)
    try:
        trainer.fit(stage, datamodule=stage.datamodule(), ckpt_path=str(ckpt) if ckpt else None)
    except SIGTERMException:
        log.info("SIGTERM: stopped at %d samples after saving a checkpoint", stage.samples_seen)
    return trainer
