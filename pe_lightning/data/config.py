"""Typed configuration of the data pipelines (the `data:` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SourceConfig:
    """One webdataset source: shards plus its mixing weight."""

    urls: str = "???"  # path, glob or brace list: /data/cc3m/{00000..00331}.tar
    weight: float = 1.0  # mixing weight among several sources
    size: Optional[int] = None  # samples in the source; else read from sizes.json / *_stats.json


@dataclass
class AugmentConfig:
    """PE's tuned training augmentations (PE_REFERENCE.md s.6). Magnitudes are not published: our choice."""

    enabled: bool = True
    crop_scale_min: float = 0.4  # random resized crop scale range (our choice)
    crop_scale_max: float = 1.0
    crop_ratio_min: float = 0.75
    crop_ratio_max: float = 1.3333
    brightness: float = 0.3  # colour-jitter magnitudes (our choice)
    saturation: float = 0.3
    hflip: float = 0.5  # probability; captions with left/right are swapped when flipped


@dataclass
class DataConfig:
    """Where samples come from and how they are read."""

    preset: str = "shapes"  # recipes/data/<preset>.yaml is merged when it exists
    root: str = "data/shapes"  # the shapes world is generated here on first use when `generate` is true
    generate: bool = True  # generate the shapes world into `root` if it is missing
    shapes_train: int = 20000  # scenes in the generated train split
    shapes_seed: int = 0
    shapes_size: int = 64  # image side of the generated shapes world (the loader resizes to image_size)
    shapes_version: int = 1  # 1: the default world; 2: multi-object, occluded, textured (#28; recipes/data/shapes_v2)
    train: list[SourceConfig] = field(default_factory=list)  # empty -> the shapes world's train split
    video: list[SourceConfig] = field(default_factory=list)  # empty -> the shapes world's video/train split
    instruct: list[SourceConfig] = field(default_factory=list)  # empty -> the shapes world's instruct split
    image_size: int = 64  # size the loader emits; the stage resizes on device per phase
    num_frames: int = 8  # frames sampled uniformly per clip
    frame_sampling: str = "uniform"  # train-time frames: "uniform" (Meta's eval rule, first and last frame) or
    #                                  "segment" (one random frame per equal segment, as ViCLIP); eval is always
    #                                  uniform (our choice: not published)
    workers: int = 2
    chunk_size: int = 16  # samples per worker chunk; batch sizes must be multiples of it
    streams: int = 0  # independent reader streams per rank (0 = max(1, workers)); the sample order depends on
    #                   it, never on the worker count (the loader uses the largest worker count <= workers that
    #                   divides it); a resumed run keeps the checkpoint's count
    resampled: bool = True  # infinite, seeded shard resampling (recommended for training)
    shuffle_buffer: int = 1000  # samples (raw bytes) per reader stream, drained at each shard's end
    video_shuffle_buffer: int = 64  # the same for video clips, whose raw bytes are much larger
    augment: AugmentConfig = field(default_factory=AugmentConfig)
