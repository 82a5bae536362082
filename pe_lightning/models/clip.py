"""`PECLIP`: the PE CLIP model in Meta's layout: text modules at top level, the vision tower in `.visual`,
`logit_scale` (softmax CLIP, no bias). A vision-only model (`cfg.text is None`: PE-Lang / PE-Spatial) has
neither text modules nor `logit_scale`.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .presets import CLIPConfig
from .text import TextTransformer
from .vision import VisionTransformer


class PECLIP(TextTransformer):
    def __init__(self, cfg: CLIPConfig):
        nn.Module.__init__(self)
        cfg = copy.deepcopy(cfg)
        cfg.validate()
        self.cfg = cfg
        self.preset_name = cfg.name or "custom"
        if cfg.text is not None:
            self._build_text(cfg.text)
            self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        else:
            self.text_cfg = None
            self.logit_scale = None
        self.visual = VisionTransformer(cfg.vision)
        self.visual.preset_name = self.preset_name
        # one config object per tower: structural edits (truncate, set_layer_scale, ...) show up in self.cfg
        self.cfg.vision = self.visual.cfg
        self.cfg.text = self.text_cfg

    @property
    def vision_only(self) -> bool:
        return self.text_cfg is None

    @property
    def embed_dim(self) -> Optional[int]:
        return self.cfg.vision.output_dim

    def _need_text(self) -> None:
        if self.text_cfg is None:
            raise RuntimeError(f"model {self.preset_name!r} is vision-only (no text tower); build it with a text "
                               f"tower (a PE-Core preset, or text={{...}}) to encode text")

    def _need_head(self) -> None:
        if self.visual.cfg.pool_type == "none":  # 'attn' (PE) and 'tok' (the vanilla baseline) both pool
            raise RuntimeError(f"model {self.preset_name!r} has no vision pooling head (pool_type='none'); use "
                               f"model.visual.forward_features for its tokens")

    def encode_image(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     normalize: bool = False) -> torch.Tensor:
        """[B, 3, H, W] (H, W multiples of the patch size) -> [B, out]; mask: bool [B, gh*gw], True = masked."""
        self._need_head()
        x = self.visual(images, mask=mask)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self._need_text()
        return super().encode_text(tokens, normalize=normalize)

    def encode_video(self, frames: torch.Tensor, normalize: bool = False,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, T, 3, H, W] -> [B, out], as Meta's `CLIP.encode_video`: with normalize=False the mean over T of
        the un-normalised frame embeddings (the zero-shot path, normalised by the caller); with normalize=True
        each frame embedding is normalised first, then averaged (the mean is not re-normalised).
        mask: optional [B, T, gh*gw]."""
        if frames.ndim != 5:
            raise ValueError(f"expected frames [B, T, 3, H, W], got shape {tuple(frames.shape)}")
        batch, steps = frames.shape[:2]
        flat_mask = mask.flatten(0, 1) if mask is not None else None
        x = self.encode_image(frames.flatten(0, 1), mask=flat_mask, normalize=normalize)
        return x.view(batch, steps, -1).mean(dim=1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (normalised image features, normalised text features, logit_scale.exp())."""
        self._need_text()
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(tokens, normalize=True)
        return image_features, text_features, self.logit_scale.exp()

    def set_grad_checkpointing(self, enable: bool = True) -> "PECLIP":
        self.visual.set_grad_checkpointing(enable)
        if self.text_cfg is not None:
            self.set_text_grad_checkpointing(enable)
        return self
