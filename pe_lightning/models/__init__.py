"""PE models: vision tower, text tower, CLIP wrapper, tokenizer, checkpoint formats.

    model = build_model("PE-Core-B16-224", checkpoint="PE-Core-B16-224.pt")
    model = build_model("tiny", vision={"use_mask_token": True})
    tokens = get_tokenizer(model.context_length)(["a photo of a cat"])
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from .checkpoint import (CheckpointError, LoadReport, detect_format, export_checkpoint, load_checkpoint,
                         read_state_dict, to_meta_state_dict)
from .clip import PECLIP
from .presets import PRESETS, CLIPConfig, TextConfig, VisionConfig, get_preset, list_presets
from .text import TextTransformer
from .tokenizer import Tokenizer, get_tokenizer
from .vision import VisionTransformer, resample_posemb


def build_model(name: Union[str, CLIPConfig], checkpoint: Optional[Union[str, os.PathLike]] = None,
                **overrides: Any) -> PECLIP:
    """A `PECLIP` for preset `name` (or a `CLIPConfig`) with `overrides` (see `get_preset`), then, if given,
    `checkpoint` loaded strictly (any supported format)."""
    cfg = get_preset(name, **overrides)
    model = PECLIP(cfg)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


__all__ = [
    "build_model", "get_preset", "list_presets", "PRESETS", "CLIPConfig", "VisionConfig", "TextConfig",
    "PECLIP", "VisionTransformer", "TextTransformer", "get_tokenizer", "Tokenizer", "load_checkpoint",
    "export_checkpoint", "to_meta_state_dict", "read_state_dict", "detect_format", "CheckpointError",
    "LoadReport", "resample_posemb",
]
