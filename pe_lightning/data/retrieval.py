"""Retrieval sets: image + caption shards (CLIP_benchmark's retrieval layout, or any img2dataset shards).

A sample's `.txt` may hold several captions, one per line (CLIP_benchmark: `str.splitlines`). The loader
yields (images float [B, 3, S, S] with Meta's eval preprocessing, captions: list of B lists of str).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch.utils.data import DataLoader, default_collate

from pe_lightning.data.classification import EvalShardDataset, resolve_benchmark
from pe_lightning.data.image_text import decode_caption, decode_image
from pe_lightning.data.shards import SkipSample
from pe_lightning.data.transforms import eval_transform

__all__ = ["load_retrieval_set"]


def _collate(items):
    images = default_collate([i for i, _ in items])
    return images, [c for _, c in items]


def load_retrieval_set(path: str | Path, image_size: int, batch_size: int, workers: int = 0, split: str = "test",
                       limit: Optional[int] = None) -> DataLoader:
    """Loader yielding (images, captions) with captions[i] the list of image i's captions."""
    shards, _ = resolve_benchmark(path, split)

    def fn(raw: dict):
        caps = [c.strip() for c in decode_caption(raw).splitlines() if c.strip()]
        if not caps:
            raise SkipSample("empty_caption")
        return eval_transform(decode_image(raw), image_size), caps

    ds = EvalShardDataset(shards, fn, limit=limit, name=str(path))
    return DataLoader(ds, batch_size=batch_size, num_workers=min(workers, len(shards)), collate_fn=_collate)
