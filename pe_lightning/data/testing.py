"""Helpers for tests (ours and other modules'): tiny shard sets and a tiny shapes world, written fast."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

TINY_WORLD = dict(train=256, size=32, retrieval=64, zeroshot_per_class=2, video_train=32, video_test=8,
                  instruct=64, instruct_test=16, probe_per_class=2, workers=1)


def tiny_shapes_world(root: str | Path, seed: int = 0, **overrides) -> Path:
    """A small complete shapes world (about a second to generate) for tests: 256 train scenes at 32 px."""
    from pe_lightning.data.shapes.writer import ensure_shapes_world

    kw = {**TINY_WORLD, **overrides}
    return ensure_shapes_world(root, seed=seed, **kw)


def png_bytes(rgb: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), 0
    tf.addfile(ti, io.BytesIO(data))


def write_tar(path: str | Path, samples: list[dict[str, bytes]]) -> Path:
    """Samples {"__key__": key, ext: bytes, ...} -> one tar shard."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            key = s["__key__"]
            for ext, data in s.items():
                if ext != "__key__":
                    add_member(tf, f"{key}.{ext}", data)
    return path


def write_image_text_shards(folder: str | Path, n_shards: int, per_shard: int, size: int = 16,
                            caption_fn: Optional[Callable[[int, int], str]] = None, sizes: Optional[str] = "sizes.json",
                            name_fmt: str = "{:05d}.tar", seed: int = 0) -> list[str]:
    """img2dataset-style shards of flat-colour images whose captions name the sample ("item S-I" by default),
    so tests can tell samples apart. `sizes`: "sizes.json", "stats" (img2dataset *_stats.json) or None."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    caption_fn = caption_fn or (lambda s, i: f"item {s}-{i}")
    paths, table = [], {}
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            rgb = tuple(int(v) for v in rng.integers(0, 256, 3))
            cap = caption_fn(s, i)
            samples.append({"__key__": f"{s:05d}{i:04d}", "png": png_bytes(rgb, size), "txt": cap.encode(),
                            "json": json.dumps({"caption": cap}).encode()})
        name = name_fmt.format(s)
        paths.append(str(write_tar(folder / name, samples)))
        table[name] = per_shard
        if sizes == "stats":
            stem = name[: -len(".tar")]
            (folder / f"{stem}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    if sizes == "sizes.json":
        (folder / "sizes.json").write_text(json.dumps(table))
    return paths
