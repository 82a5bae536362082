"""Exact per-pixel object masks: `{key}.mask.png` (8-bit, 0 = background, i = the i-th object of the
sample's json `objects`, whose `label` is its colour-shape class), and a loader for dense probes and the
spatial stage: batches of {"image", "instance", "semantic", "key"} where semantic = 1 + class label
(0 = background), masks resized with nearest neighbour to the image size."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pe_lightning.data.classification import EvalShardDataset, resolve_benchmark
from pe_lightning.data.image_text import decode_image
from pe_lightning.data.shards import SkipSample
from pe_lightning.data.transforms import eval_transform

MASK_EXT = "mask.png"


def encode_mask(mask: Image.Image) -> bytes:
    buf = io.BytesIO()
    mask.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """mask.png bytes -> uint8 [H, W] instance ids."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.uint8).copy()


def semantic_from_instances(inst: np.ndarray, objects: list[dict]) -> np.ndarray:
    """Instance ids -> 1 + class label per pixel (0 = background)."""
    lut = np.zeros(256, np.int64)
    for o in objects:
        lut[int(o["id"])] = int(o["label"]) + 1
    return lut[inst]


def load_mask_set(path: str | Path, image_size: int, batch_size: int, workers: int = 0, split: str = "test",
                  limit: Optional[int] = None) -> DataLoader:
    """Shards with image + mask.png + json(objects) -> batches {"image", "instance", "semantic", "key"}."""
    shards, _ = resolve_benchmark(path, split)

    def fn(raw: dict):
        if MASK_EXT not in raw or "json" not in raw:
            raise SkipSample("missing_mask")
        try:
            meta = json.loads(raw["json"])
            inst = decode_mask(raw[MASK_EXT])
        except Exception as e:
            raise SkipSample("bad_mask", f"{type(e).__name__}: {e}") from None
        img = decode_image(raw)
        if inst.shape[:2] != (image_size, image_size):
            inst = np.asarray(Image.fromarray(inst).resize((image_size, image_size), Image.NEAREST))
        sem = semantic_from_instances(inst, meta.get("objects", []))
        return {"image": eval_transform(img, image_size), "instance": torch.from_numpy(inst.astype(np.int64)),
                "semantic": torch.from_numpy(sem), "key": raw["__key__"]}

    def collate(items):
        return {"image": torch.stack([i["image"] for i in items]),
                "instance": torch.stack([i["instance"] for i in items]),
                "semantic": torch.stack([i["semantic"] for i in items]),
                "key": [i["key"] for i in items]}

    ds = EvalShardDataset(shards, fn, limit=limit, name=str(path))
    return DataLoader(ds, batch_size=batch_size, num_workers=min(workers, len(shards)), collate_fn=collate)
