"""Data pipelines: resumable webdataset streams (image-text, video-text, instruction), eval sets
(CLIP_benchmark zero-shot classification, retrieval, masks), transforms, and the shapes world.

Names are imported lazily, so `pe_lightning.data.shapes` (the generator) does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AugmentConfig": "config", "DataConfig": "config", "SourceConfig": "config",
    "ImageTextDataModule": "datamodule", "VideoTextDataModule": "datamodule",
    "InstructionDataModule": "datamodule", "StreamDataModule": "datamodule", "MultiDataModule": "datamodule",
    "as_data_config": "datamodule",
    "load_classification_set": "classification", "load_retrieval_set": "retrieval",
    "DataError": "shards", "SkipSample": "shards", "discover_size": "shards", "expand_shards": "shards",
    "eval_transform": "transforms", "TrainTransform": "transforms", "swap_left_right": "transforms",
    "ensure_shapes_world": "shapes.writer", "load_mask_set": "shapes.masks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pe_lightning.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pe_lightning.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
