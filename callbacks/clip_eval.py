"""Zero-shot classification and image<->text retrieval of a CLIP model, every `every_n_steps` and at the end.

Recipe: `callbacks: [{name: clip_eval, args: {every_n_steps: 0, limit: null, parent: true}}]`.
Reads the eval sets of the recipe (`eval.zeroshot`: CLIP_benchmark-layout folders, `eval.retrieval`:
image-caption shards; the data preset sets them). The first set of each kind gives the headline keys of
export/metrics.json:
  zeroshot_top1, zeroshot_top5, zeroshot_heldout_top1, zeroshot_seen_top1, zeroshot_<factor>_acc,
  retrieval_i2t_r1 ... retrieval_t2i_r10;
every set also logs under its own name (zeroshot_<name>_top1, retrieval_<name>_i2t_r1, ...). With `parent`,
the same figures of the stage's parent export go under `parent_<key>` at the end (what the stage gained or
cost). A model without a text tower or pooling head (PE-Lang, PE-Spatial) has no CLIP figures of its own.
Runs on global rank 0 on the un-wrapped model; the other ranks wait at a barrier.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from pe_lightning.eval.clip_sets import clip_figures, missing_sets

log = logging.getLogger("pe_lightning")


def is_clip_model(model) -> bool:
    """A model with a text tower and a pooled image embedding (what zero-shot and retrieval need)."""
    return (not getattr(model, "vision_only", True)) and model.visual.cfg.pool_type != "none"


class ClipEval(L.Callback):
    label = "eval"  # the log line's name
    logged_suffix = "_top1"  # besides the stage's headline keys, the log line shows the keys ending so

    def __init__(self, cfg, every_n_steps: int = 0, limit: int | None = None, parent: bool = True):
        self.cfg = cfg
        self.every_n_steps = every_n_steps  # 0: only at the end of the stage
        self.limit = limit  # samples per set (None: all); a quick look during long runs
        self.parent = parent  # also evaluate the parent export at the end, under `parent_` keys

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        missing = missing_sets(self.cfg)
        if missing:
            raise FileNotFoundError(f"eval set {missing[0]} does not exist. Point the recipe's eval.zeroshot / "
                                    "eval.retrieval entries at existing folders, or set eval.zeroshot=[] "
                                    "eval.retrieval=[]")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not pl_module.finished:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.finished:
            return
        pl_module.metrics.update(self.evaluate(trainer, pl_module))
        if self.parent and trainer.is_global_zero:
            parent = pl_module.parent_model()
            if parent is not None and is_clip_model(parent):
                figures = self._evaluate_model(parent, pl_module)
                pl_module.metrics.update({f"parent_{k}": v for k, v in figures.items()})
                self._log_line("parent", pl_module, figures)
        trainer.strategy.barrier()

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        metrics: dict[str, float] = {}
        model = pl_module.eval_model()
        if trainer.is_global_zero and is_clip_model(model):
            metrics = self._evaluate_model(model, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            self._log_line(self.label, pl_module, metrics)
        trainer.strategy.barrier()
        return metrics

    @torch.inference_mode()
    def _evaluate_model(self, model: torch.nn.Module, pl_module: L.LightningModule) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            return self._run_sets(model, pl_module)
        finally:
            model.train(was_training)

    def _log_line(self, what: str, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        shown = {k: v for k, v in metrics.items() if k in pl_module.headline_metrics or k.endswith(self.logged_suffix)}
        log.info("%s at %d samples: %s", what, pl_module.samples_seen,
                 ", ".join(f"{k}={v:.3f}" for k, v in sorted(shown.items())))

    def _run_sets(self, model: torch.nn.Module, pl_module: L.LightningModule) -> dict[str, float]:
        return clip_figures(model, self.cfg, pl_module.current_phase.resolution, pl_module.device, self.limit)
