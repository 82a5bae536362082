"""Zero-shot classification and image<->text retrieval, every `eval.every_n_steps` steps and at the end.

Reads the recipe's `eval.zeroshot` (CLIP_benchmark-layout folders) and `eval.retrieval` (image-caption
shards). The first set of each kind gives the headline keys of export/metrics.json:
  zeroshot_top1, zeroshot_top5, zeroshot_heldout_top1, zeroshot_seen_top1, zeroshot_<factor>_acc,
  retrieval_i2t_r1 ... retrieval_t2i_r10;
every set also logs under its own name (zeroshot_<name>_top1, retrieval_<name>_i2t_r1, ...).
Runs on global rank 0 on the un-wrapped model; the other ranks wait at a barrier.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from pe_lightning.data.classification import load_classification_set
from pe_lightning.data.retrieval import load_retrieval_set
from pe_lightning.eval import build_zeroshot_classifier, retrieval_eval, zeroshot_eval
from pe_lightning.models.tokenizer import get_tokenizer
from pe_lightning.stages.pretrain import resize_to

log = logging.getLogger("pe_lightning")
HEADLINE = ("zeroshot_colour_acc", "zeroshot_shape_acc", "retrieval_i2t_r1", "retrieval_t2i_r1")


class ClipEval(L.Callback):
    def __init__(self, cfg, every_n_steps: int | None = None, limit: int | None = None):
        self.cfg = cfg
        self.every_n_steps = cfg.eval.every_n_steps if every_n_steps is None else every_n_steps
        self.limit = limit  # samples per set (None: all); a quick look during long runs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for entry in [*self.cfg.eval.zeroshot, *self.cfg.eval.retrieval]:
            if not Path(entry.path).exists():
                raise FileNotFoundError(f"eval set {entry.name!r}: {entry.path} does not exist. Point the "
                                        "recipe's eval.zeroshot / eval.retrieval entries at existing folders, "
                                        "or set eval.zeroshot=[] eval.retrieval=[]")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not pl_module.finished:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.finished:
            pl_module.metrics.update(self.evaluate(trainer, pl_module))

    @torch.inference_mode()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            model = pl_module.model
            was_training = model.training
            model.eval()
            try:
                metrics = self._run_sets(model, pl_module)
            finally:
                model.train(was_training)
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            headline = {k: v for k, v in metrics.items() if k in HEADLINE or k.endswith("_top1")}
            log.info("eval at %d samples: %s", pl_module.samples_seen,
                     ", ".join(f"{k}={v:.3f}" for k, v in sorted(headline.items())))
        trainer.strategy.barrier()
        return metrics

    def _run_sets(self, model: torch.nn.Module, pl_module: L.LightningModule) -> dict[str, float]:
        ev, device = self.cfg.eval, pl_module.device
        tokenize = get_tokenizer(model.context_length)
        resolution = pl_module.current_phase.resolution
        preprocess = lambda images: resize_to(images.to(device), resolution)  # noqa: E731
        metrics: dict[str, float] = {}
        for index, entry in enumerate(ev.zeroshot):
            loader, classnames, templates = load_classification_set(
                entry.path, self.cfg.data.image_size, ev.batch_size, limit=self.limit)
            heldout = _read_lines(entry.heldout_classes) if entry.heldout_classes else None
            classifier = build_zeroshot_classifier(model, tokenize, classnames, templates, device)
            result = zeroshot_eval(model, loader, classifier, classnames, heldout=heldout,
                                   factor_names=list(ev.factor_names) or None, preprocess=preprocess)
            metrics.update(_prefixed(result, f"zeroshot_{entry.name}_"))
            if index == 0:
                metrics.update(_prefixed(result, "zeroshot_"))
        for index, entry in enumerate(ev.retrieval):
            loader = load_retrieval_set(entry.path, self.cfg.data.image_size, ev.batch_size, limit=self.limit)
            result = retrieval_eval(model, loader, tokenize, device, preprocess=preprocess)
            metrics.update(_prefixed(result, f"retrieval_{entry.name}_"))
            if index == 0:
                metrics.update(_prefixed(result, "retrieval_"))
        return metrics


def _prefixed(result: dict, prefix: str) -> dict[str, float]:
    return {prefix + key: float(value) for key, value in result.items()}


def _read_lines(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
