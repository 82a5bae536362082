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

from pathlib import Path
from typing import Optional

import lightning as L
import torch

from pe_lightning.callback_loader import resolve_class
from pe_lightning.data.transforms import resize_to
from pe_lightning.eval.video import load_video_eval_set, video_eval
from pe_lightning.models.tokenizer import get_tokenizer

ClipEval = resolve_class("clip_eval")  # the schedule, the parent figures and the rank-0 logic live there


class VideoEval(ClipEval):
    label = "video eval"
    logged_suffix = "_r1"

    def __init__(self, cfg, every_n_steps: int = 0, limit: Optional[int] = None, parent: bool = True,
                 num_frames: int = 8, path: Optional[str] = None):
        super().__init__(cfg, every_n_steps=every_n_steps, limit=limit, parent=parent)  # limit: clips
        self.num_frames = num_frames  # frames per clip (Meta evaluates with 8)
        self.path = Path(path) if path else Path(cfg.data.root) / "video" / "test"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"video eval set {self.path} does not exist: generate the shapes world "
                                    "(pe-lightning data shapes --out DIR), give the callback `path: DIR` of "
                                    "held-out video shards, or drop video_eval from the recipe's callbacks")

    def _run_sets(self, model: torch.nn.Module, pl_module: L.LightningModule) -> dict[str, float]:
        resolution = pl_module.current_phase.resolution
        clips_per_batch = max(1, self.cfg.eval.batch_size // self.num_frames)  # frames per forward ~ eval batch
        loader = load_video_eval_set(self.path, self.cfg.data.image_size, self.num_frames, clips_per_batch,
                                     limit=self.limit)
        preprocess = lambda frames: resize_to(frames, resolution)  # noqa: E731  (on the device, flattened)
        metrics = video_eval(model, loader, get_tokenizer(model.context_length), pl_module.device,
                             preprocess=preprocess)
        return {k: float(v) for k, v in metrics.items()}
