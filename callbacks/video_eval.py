"""Video zero-shot classification and video<->text retrieval with the frame mean, every `every_n_steps` and at
the end (pe_lightning/eval/video.py).

Recipe: `callbacks: [{name: video_eval, args: {every_n_steps: 0, limit: null, parent: true, num_frames: 8}}]`.
Reads held-out video2dataset shards (`.mp4` + `.txt` + `.json`) at `path` (default `<data.root>/video/test`,
the shapes world's 200 test clips); each clip is `num_frames` uniform frames (Meta's index rule, first and last
frame included) at the stage's current resolution, embedded as the normalised mean of its un-normalised frame
embeddings. Keys in export/metrics.json: video_t2v_r{1,5,10}, video_v2t_r{1,5,10}, and with shapes-world
labels video_zeroshot_top1 (colour x shape), video_motion_top1, video_axis_top1, the per-motion accuracies
and the order-blind swap rates (video_motion_swap_lr/_ud/_gs: see eval/video.py on what a frame mean cannot
see). With `parent`, the same figures of the stage's parent export go under `parent_<key>` at the end.
Runs on global rank 0 on the un-wrapped model; the other ranks wait at a barrier.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from pe_lightning.data.transforms import resize_to
from pe_lightning.eval.video import load_video_eval_set, video_eval
from pe_lightning.models.tokenizer import get_tokenizer

log = logging.getLogger("pe_lightning")


def can_embed_video(model) -> bool:
    """A model with a text tower and a pooled image embedding (what the frame mean and captions need)."""
    return (not getattr(model, "vision_only", True)) and model.visual.cfg.pool_type != "none"


class VideoEval(L.Callback):
    def __init__(self, cfg, every_n_steps: int = 0, limit: Optional[int] = None, parent: bool = True,
                 num_frames: int = 8, path: Optional[str] = None):
        self.cfg = cfg
        self.every_n_steps = every_n_steps  # 0: only at the end of the stage
        self.limit = limit  # clips (None: all); a quick look during long runs
        self.parent = parent  # also evaluate the parent export at the end, under `parent_` keys
        self.num_frames = num_frames  # frames per clip (Meta evaluates with 8)
        self.path = Path(path) if path else Path(cfg.data.root) / "video" / "test"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"video eval set {self.path} does not exist: generate the shapes world "
                                    "(pe-lightning data shapes --out DIR), give the callback `path: DIR` of "
                                    "held-out video shards, or drop video_eval from the recipe's callbacks")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not pl_module.finished:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.finished:
            return
        pl_module.metrics.update(self.evaluate(trainer, pl_module))
        if self.parent and trainer.is_global_zero:
            parent = pl_module.parent_model()
            if parent is not None and can_embed_video(parent):
                figures = self._evaluate_model(parent, pl_module)
                pl_module.metrics.update({f"parent_{k}": v for k, v in figures.items()})
                self._log_line("parent", pl_module, figures)
        trainer.strategy.barrier()

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        metrics: dict[str, float] = {}
        model = pl_module.eval_model()
        if trainer.is_global_zero and can_embed_video(model):
            metrics = self._evaluate_model(model, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            self._log_line("video eval", pl_module, metrics)
        trainer.strategy.barrier()
        return metrics

    @torch.inference_mode()
    def _evaluate_model(self, model: torch.nn.Module, pl_module: L.LightningModule) -> dict[str, float]:
        device = pl_module.device
        resolution = pl_module.current_phase.resolution
        clips_per_batch = max(1, self.cfg.eval.batch_size // self.num_frames)  # frames per forward ~ eval batch
        loader = load_video_eval_set(self.path, self.cfg.data.image_size, self.num_frames, clips_per_batch,
                                     limit=self.limit)
        preprocess = lambda frames: resize_to(frames, resolution)  # noqa: E731  (on the device, flattened)
        metrics = video_eval(model, loader, get_tokenizer(model.context_length), device, preprocess=preprocess)
        return {k: float(v) for k, v in metrics.items()}

    @staticmethod
    def _log_line(what: str, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        shown = {k: v for k, v in metrics.items() if k in pl_module.headline_metrics or k.endswith("_r1")}
        log.info("%s at %d samples: %s", what, pl_module.samples_seen,
                 ", ".join(f"{k}={v:.3f}" for k, v in sorted(shown.items())))
