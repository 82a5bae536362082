"""Zero-shot classification sets in CLIP_benchmark's webdataset layout, and the shared eval-set reader.

CLIP_benchmark layout (what `clip_benchmark_export_wds` writes and `build_wds_dataset` reads):
```
DATASET/classnames.txt                            one class name per line
DATASET/zeroshot_classification_templates.txt     one template per line, with {c}
DATASET/test/nshards.txt, DATASET/test/0.tar ...  image (.webp/.png/.jpg) + .cls (integer label)
```
`load_classification_set` also takes the shard folder itself, a glob or a brace list, and then looks for
the two text files beside the shards or one level up. Images get Meta's eval preprocessing. Unreadable
samples are skipped and counted (`loader.dataset.skipped`, exact with workers=0) and logged.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pe_lightning.data.image_text import decode_image
from pe_lightning.data.shards import DataError, SkipSample, expand_shards, iter_tar_samples, read_lines
from pe_lightning.data.transforms import eval_transform

log = logging.getLogger(__name__)

__all__ = ["load_classification_set", "resolve_benchmark", "EvalShardDataset", "read_classnames"]


def resolve_benchmark(path: str | Path, split: str = "test") -> tuple[list[str], list[Path]]:
    """(shards, folders to look for classnames/templates in, nearest first)."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    if p.is_dir():
        for d in (p / split, p):
            nfile = d / "nshards.txt"
            if nfile.is_file():
                n = int(nfile.read_text().strip())
                shards = [str(d / f"{i}.tar") for i in range(n)]
                return expand_shards(shards, what=str(path)), [d, d.parent] if d != p else [p, p.parent]
            found = sorted(glob.glob(str(d / "*.tar")))
            if found:
                return found, [d, d.parent] if d != p else [p, p.parent]
        raise DataError(f"{path}: no shards found (looked for {p / split}/nshards.txt, {p / split}/*.tar and "
                        f"{p}/*.tar); generate the set (pe-lightning data shapes --out DIR) or fix the path")
    if not p.exists() and not any(ch in str(path) for ch in "*?[{"):
        raise DataError(f"{path}: no such file or directory; generate the set or fix the path")
    shards = expand_shards(str(path), what=str(path))
    first = Path(shards[0]).parent
    return shards, [first, first.parent]


def _find(folders: list[Path], name: str, what: str) -> Path:
    for d in folders:
        if (d / name).is_file():
            return d / name
    raise DataError(f"{what}: {name} not found in {' or '.join(str(d) for d in folders)} (CLIP_benchmark layout "
                    "puts it next to the split folder)")


def read_classnames(folders: list[Path], what: str) -> tuple[list[str], list[str]]:
    classnames = read_lines(_find(folders, "classnames.txt", what))
    templates = read_lines(_find(folders, "zeroshot_classification_templates.txt", what))
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise DataError(f"{what}: templates without {{c}}: {bad[:3]}")
    return classnames, templates


class EvalShardDataset(IterableDataset):
    """Sequential pass over shards (split across DataLoader workers by shard); `fn(raw)` -> item or SkipSample."""

    def __init__(self, shards: list[str], fn: Callable[[dict], Any], limit: Optional[int] = None,
                 name: str = "eval"):
        super().__init__()
        self.shards = list(shards)
        self.fn = fn
        self.limit = limit
        self.name = name
        self.skipped: Counter = Counter()

    def _count(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 5:
            log.warning("data %s: skipped sample (%s): %s", self.name, reason, detail)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        n, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        limit = None if self.limit is None else (self.limit - wid + n - 1) // n
        produced = 0
        for url in self.shards[wid::n]:
            for raw in iter_tar_samples(url, self._count):
                if limit is not None and produced >= limit:
                    return
                try:
                    item = self.fn(raw)
                except SkipSample as e:
                    self._count(e.reason, f"{url} key {raw.get('__key__')}: {e.detail}")
                    continue
                produced += 1
                yield item


def _decode_label(raw: dict) -> int:
    for ext in ("cls", "label", "cls2"):
        if ext in raw:
            try:
                return int(raw[ext].decode("utf-8").strip())
            except (ValueError, UnicodeDecodeError) as e:
                raise SkipSample("bad_label", str(e)) from None
    raise SkipSample("missing_label")


def load_classification_set(path: str | Path, image_size: int, batch_size: int, workers: int = 0,
                            split: str = "test", limit: Optional[int] = None
                            ) -> tuple[DataLoader, list[str], list[str]]:
    """(loader yielding (images float [B,3,S,S], labels long [B]), classnames, templates)."""
    shards, folders = resolve_benchmark(path, split)
    classnames, templates = read_classnames(folders, str(path))

    def fn(raw: dict) -> tuple[torch.Tensor, int]:
        label = _decode_label(raw)
        if not 0 <= label < len(classnames):
            raise SkipSample("bad_label", f"label {label} outside [0, {len(classnames)})")
        return eval_transform(decode_image(raw), image_size), label

    ds = EvalShardDataset(shards, fn, limit=limit, name=str(path))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=min(workers, len(shards)))
    return loader, classnames, templates
