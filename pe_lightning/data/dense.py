"""Dense-alignment batches (the spatial stage): images with their cached teacher target, from the data shards.

    dm = DenseDataModule(cfg.data, cache_dir="data/shapes/teacher_cache/oracle-g32-t8-d128", tokens=8,
                         mask_ratio=0.75, seed=0, teacher="oracle", batch_size=64)
    dm.setup()                           # the shapes world and (oracle) the teacher cache, built when missing
    for batch in dm.train_dataloader():
        batch["image"]       # float [B, 3, S, S]  flip + colour jitter, never a crop (see below)
        batch["key"]         # list[str]           the samples' keys (what the cache is keyed by)
        batch["flip"]        # bool [B]            whether the image was flipped left-right
        batch["target"]      # float [B, g*g, C]   the cached teacher feature, row-major token grid, mirrored
                             #                     where the image was flipped (TeacherCache.lookup)
        batch["patch_mask"]  # bool [B, g*g]       the student's MaskFeat mask (True = masked), exactly
                             #                     round(mask_ratio * g*g) per row

Augmentation policy (teachers/cache.py): the cached target belongs to the whole, squash-resized image, so the
image is never cropped (a random crop would need the target resampled from a g x g grid, too coarse to be
faithful: `data.augment.crop_scale_min/max` must be 1); a horizontal flip is followed exactly by mirroring
the cached grid; colour jitter moves no pixel. Every sample's flip, jitter and patch mask are drawn from
(seed, global sample index), so they do not depend on the worker count or a resume (the global index of a
sample does depend on the number of ranks and streams: data/stream.py).

A sample whose key is not in the cache (skipped when the cache was built, e.g. no mask for the oracle) is
skipped and counted (`not_in_teacher_cache`); a cache that is not for these shards, for another token grid,
or with a missing or truncated shard is a DataError naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from pe_lightning.data.config import SourceConfig
from pe_lightning.data.datamodule import StreamDataModule
from pe_lightning.data.image_text import ImageTextDecoder, decode_image
from pe_lightning.data.shards import DataError, SkipSample, resolve_sources
from pe_lightning.data.transforms import sample_rng

log = logging.getLogger(__name__)

__all__ = ["DenseDecoder", "DenseDataModule", "default_cache_dir", "patch_mask_for", "MASK_TAG"]

MASK_TAG = 0x3A5C  # sample_rng tag of the patch mask (the augmentation uses tag 0)


def patch_mask_for(seed: int, index: int, num_tokens: int, ratio: float) -> torch.Tensor:
    """bool [num_tokens], exactly round(ratio * num_tokens) True, drawn from (seed, global sample index)."""
    num_masked = int(round(float(ratio) * num_tokens))
    order = sample_rng(seed, index, tag=MASK_TAG).permutation(num_tokens)
    return torch.from_numpy(order < num_masked)


def _cache_stems(cache_dir: Path) -> set[str]:
    """The stems of the source shards a cache was built for (its companion shards are named by them)."""
    from pe_lightning.teachers.cache import SETTINGS_FILE, _shard_stem

    info = json.loads((cache_dir / SETTINGS_FILE).read_text())
    return {_shard_stem(s) for s in info["sources"]}


class DenseDecoder(ImageTextDecoder):
    """Raw sample -> {"image", "key", "flip", "patch_mask"}; chunks gain "target" from the teacher cache.

    No caption is needed (dense data such as SA-1B has none). `cache` is an open `TeacherCache`."""

    def __init__(self, image_size: int, augment: Any, seed: int, cache: Any, mask_ratio: float):
        crop = (float(augment.crop_scale_min), float(augment.crop_scale_max))
        if getattr(augment, "enabled", True) and crop != (1.0, 1.0):
            raise DataError(f"data.augment.crop_scale_min/max = {crop}: the spatial stage trains without random "
                            "crops (its cached teacher target covers the whole image); set "
                            "data.augment.crop_scale_min=1 data.augment.crop_scale_max=1")
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise DataError(f"mask ratio must be in [0, 1), got {mask_ratio}")
        super().__init__(image_size, augment, tokenize=None, seed=seed, train=True)
        self.cache = cache
        self.mask_ratio = float(mask_ratio)
        self.num_tokens = int(cache.tokens) ** 2

    @property
    def draft(self) -> Optional[int]:
        return None  # no crop: decode at full resolution, as the cache did

    def validate(self, raw: dict) -> None:
        decode_image(raw)
        if raw["__key__"] not in self.cache:
            raise SkipSample("not_in_teacher_cache", raw["__key__"])

    def decode(self, raw: dict, index: int) -> dict:
        img = decode_image(raw)
        key = raw["__key__"]
        if key not in self.cache:
            raise SkipSample("not_in_teacher_cache", key)
        t = self.transform
        params = t.sample(sample_rng(self.seed, index), img.width, img.height)
        params.box = (0.0, 0.0, float(img.width), float(img.height))  # never a crop (module docstring)
        return {"image": t.apply(img, params), "key": key, "flip": bool(params.flip),
                "patch_mask": patch_mask_for(self.seed, index, self.num_tokens, self.mask_ratio)}

    def collate(self, samples: list[dict]) -> dict:
        keys = [s["key"] for s in samples]
        flips = [s["flip"] for s in samples]
        return {"image": torch.stack([s["image"] for s in samples]), "key": keys,
                "flip": torch.tensor(flips, dtype=torch.bool),
                "target": self.cache.lookup(keys, flip=flips),
                "patch_mask": torch.stack([s["patch_mask"] for s in samples])}


def default_cache_dir(data_cfg: Any, teacher: str, grid: int, tokens: int, dim: int,
                      oracle: Optional[dict] = None) -> Path:
    """`<data.root>/teacher_cache/<teacher>-g<grid>-t<tokens>-d<dim>`, with `-<8 hex>` of the source list when
    `data.train` names its own shards (one cache folder holds the cache of one source list); a graded oracle
    (`oracle` = its kind, clip and radius) is `oracle-graded-c<clip>-r<radius>-g...`."""
    label = teacher
    if oracle:
        label += f"-{oracle['kind']}-c{float(oracle['clip']):g}-r{float(oracle['radius']):g}"
    name = f"{label}-g{int(grid)}-t{int(tokens)}-d{int(dim)}"
    sources = [[str(s.urls), float(s.weight)] for s in (data_cfg.train or [])]
    if sources:
        name += "-" + hashlib.sha1(json.dumps(sources).encode()).hexdigest()[:8]
    return Path(data_cfg.root) / "teacher_cache" / name


class DenseDataModule(StreamDataModule):
    """Image batches with their cached teacher target (module docstring) from `data.train` (or the shapes
    world's train split). `setup` builds an `oracle` cache that is missing or unfinished (resumable: finished
    shards are kept), split over the ranks; other teachers' caches are built with `pe-lightning teacher`."""

    sources_key = "train"
    shapes_split = "train"

    def __init__(self, cfg: Any, cache_dir: str | Path, tokens: int, mask_ratio: float, seed: int = 0,
                 teacher: str = "oracle", grid: int = 32, dim: int = 128, build: bool = True,
                 magnitude: float = 10.0, oracle: Optional[dict] = None, **kwargs: Any):
        super().__init__(cfg, tokenize=None, seed=seed, **kwargs)
        self.cache_dir = Path(cache_dir)
        self.tokens, self.mask_ratio = int(tokens), float(mask_ratio)
        self.teacher, self.grid, self.dim, self.build = teacher, int(grid), int(dim), bool(build)
        self.magnitude = float(magnitude)
        self.oracle = dict(oracle or {})  # the oracle's kind, clip, radius when not the binary default
        self._cache = None

    # ----- the teacher cache -----
    def _source_shards(self) -> list[str]:
        confs = self.source_configs() or [SourceConfig(urls=str(Path(self.cfg.root) / self.shapes_split))]
        what = f"data.{self.sources_key}" if self.source_configs() else f"shapes world {self.shapes_split}"
        return [shard for s in resolve_sources(confs, what=what) for shard in s.shards]

    def cache_complete(self) -> bool:
        """The cache's last build ran to its end over every shard (index.json says complete)."""
        from pe_lightning.teachers.cache import INDEX_FILE

        try:
            return bool(json.loads((self.cache_dir / INDEX_FILE).read_text())["complete"])
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def ensure_cache(self) -> None:
        """Build (or finish) a missing `oracle` cache; a finished cache is left as it is (a shard truncated
        since is then the reader's clear error, not a silent rebuild)."""
        if self.cache_complete():
            return
        if self.teacher != "oracle" or not self.build:
            return  # opening it reports what is missing and the command that builds it
        from pe_lightning.teachers import build_teacher
        from pe_lightning.teachers.cache import build_cache

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI; effective before OpenMP starts
        shards = self._source_shards()
        log.info("teacher cache: building the oracle cache of %d shards in %s", len(shards), self.cache_dir)
        kw = {"grid": self.grid, "magnitude": self.magnitude, **self.oracle}
        rank, world = self._resolve_rank()
        summary = build_cache(build_teacher("oracle", **kw), shards, self.cache_dir, tokens=self.tokens,
                              dim=self.dim, rank=rank, world=world, teacher_args=kw)
        log.info("teacher cache: %d images in %.1f s (%s img/s), %d shards already finished", summary["images"],
                 summary["seconds"], f"{summary['images_per_s']:.0f}" if summary["images_per_s"] else "-",
                 summary["skipped"])

    @property
    def cache(self):
        """The open TeacherCache, checked against the data (its shards and token grid)."""
        if self._cache is None:
            from pe_lightning.teachers.cache import TeacherCache

            if not (self.cache_dir / "cache.json").is_file():
                hint = ("it is built automatically for the oracle teacher (spatial.build_cache=true)"
                        if self.teacher == "oracle" else "SAM 2.1 weights are the user's")
                raise DataError(
                    f"no teacher cache at {self.cache_dir} ({hint}); build it with `pe-lightning teacher "
                    f"{'sam' if self.teacher == 'sam2' else self.teacher} --data <the training shards> --out "
                    f"{self.cache_dir} --grid {self.grid} --tokens {self.tokens} --dim {self.dim}`")
            cache = TeacherCache(self.cache_dir)
            if cache.tokens != self.tokens:
                raise DataError(f"teacher cache {self.cache_dir} is on a {cache.tokens}x{cache.tokens} token grid, "
                                f"the student's is {self.tokens}x{self.tokens} (resolution / patch size); build "
                                f"one with --tokens {self.tokens} or point spatial.cache_dir at it")
            from pe_lightning.teachers.cache import _shard_stem

            stems = _cache_stems(self.cache_dir)
            absent = [s for s in self._source_shards() if _shard_stem(s) not in stems]
            if absent:
                raise DataError(f"teacher cache {self.cache_dir} was not built for data shard {absent[0]} "
                                f"({len(absent)} shards not covered); rebuild it for the training shards or "
                                "point spatial.cache_dir at their cache")
            self._cache = cache
        return self._cache

    def setup(self, stage: Optional[str] = None) -> None:
        """The shapes world, then the teacher cache, built on every rank (each builds its share of the shards,
        `build_cache` waits for all of them and rank 0 writes the index), then the stream."""
        if not self._is_setup:
            self.ensure_data()
            self.ensure_cache()
        super().setup(stage)

    def make_decoder(self) -> DenseDecoder:
        return DenseDecoder(self.cfg.image_size, self.cfg.augment, self.seed, self.cache, self.mask_ratio)

