"""The teacher cache: mask-logit teacher features stored once, as companion shards of the data shards.

Why: the SAM 2.1 32x32-prompt teacher costs ~0.2 s per image on an H200 (hundreds of student steps) and its
raw feature is 2 MiB per image at 448 px, so the spatial stage trains from a cache, never online.

Layout of the cache folder `DIR`
--------------------------------
- `DIR/cache.json`: the settings (teacher and its arguments, prompt grid n, token grid g, stored dim,
  projection seed, teacher input size) and the source shards in order. A folder holding other settings is
  refused (choose another `--out`).
- `DIR/<stem>.tar`, one per source shard `<...>/<stem>.tar`: a webdataset-style tar with one member
  `KEY.teacher.npy` per sample, KEY the data's own sample key: an fp16 array `[g, g, dim]` (token grid,
  row-major, channels last).
- `DIR/<stem>.json`: written after its tar, the shard's "finished" record: keys, byte offsets, file size,
  the measured similarity error, samples skipped, seconds.
- `DIR/index.json`: a summary of every finished shard (counts, errors, throughput); rewritten at the end of
  every run. Readers do not need it.
Every file is written atomically (temp file in DIR, flush + fsync, `os.replace`).

What is stored (the compression; all "our choice")
--------------------------------------------------
1. The teacher's n*n mask-logit maps are resized to the student's token grid g x g: bilinear on the
   logits, antialiased (teachers/masklogits.resize_logits). Each token gets an n*n-channel feature.
2. A fixed random projection of the n*n channels to `dim` (default 128): `R = randn(n*n, dim) / sqrt(dim)`
   from `torch.Generator().manual_seed(seed)`, the same matrix for every image and shard. By the
   Johnson-Lindenstrauss lemma inner products, hence pairwise cosine similarities, are approximately
   preserved, with an error of order 1/sqrt(dim) that does not depend on n*n. When dim >= n*n the
   channels are stored unprojected (exact).
3. fp16.
The spatial loss uses only the per-image token cosine-similarity matrix, so fidelity is **measured on that
matrix**: for every image, `|S_full - S_stored|` over its off-diagonal token pairs (the diagonal is 1 in
both), with S_full from the fp32 resized features before projection and S_stored from the stored fp16
projection. Each shard's json reports the mean absolute error, its RMS, the 99th percentile and the max;
the index aggregates them (pair-weighted mean and RMS, the worst shard's p99, the max). The statistics
stream (a histogram gives the p99 to 1e-4), so a shard's errors never sit in memory.
Beside the error, the **effective rank** of each image's target Gram matrix (`effective_rank`: exp of the
entropy of its normalised singular values, Roy & Vetterli 2007; from the fp32 features before projection):
1 when every token is +-1 times one vector (the binary oracle on a one-object image), up to g*g. Each shard's
json reports its mean, min and max over images; the index, their image-weighted mean, min and max.

Resume and ranks
----------------
A shard is finished when its json exists and its tar has the recorded size; finished shards are skipped,
so an interrupted run resumes at the first unfinished shard (a half-written shard is only a temp file).
Shards are split round-robin over ranks: `rank` / `world` arguments, else torch.distributed, else the
RANK / WORLD_SIZE environment variables (torchrun); each rank builds shards `i % world == rank`.

Augmentation (the policy we recommend: random crop OFF, horizontal flip followed, colour jitter free)
----------------------------------------------------------------------------------------------------
The cached target belongs to the un-augmented, squash-resized image. Colour jitter moves no pixel, so the
target still holds. A horizontal flip is followed exactly by mirroring the stored token grid:
`lookup(keys, flip=[...])` (the point grid and the resize are mirror-symmetric, so the flipped image's
similarity matrix is the mirrored one; the flipped image's features are the mirrored features with their
prompt channels permuted, and a channel permutation leaves cosine similarities unchanged). A random crop
would need the features resampled from a g x g grid, which is too coarse to be faithful: the spatial
stage should run with crop off (set the crop scale to [1, 1]).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from pe_lightning.data.image_text import decode_image
from pe_lightning.data.shapes.masks import MASK_EXT, decode_mask
from pe_lightning.data.shards import DataError, SkipSample, expand_shards, iter_tar_samples
from pe_lightning.data.transforms import eval_transform
from pe_lightning.io import write_atomic
from pe_lightning.teachers.masklogits import MaskLogitTeacher

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_VERSION",
    "MEMBER_EXT",
    "CacheSettings",
    "projection_matrix",
    "compress",
    "cosine_gram",
    "similarity_error",
    "effective_rank",
    "ErrorStats",
    "build_cache",
    "TeacherCache",
    "resolve_rank",
]

CACHE_VERSION = 1
MEMBER_EXT = "teacher.npy"
SETTINGS_FILE = "cache.json"
INDEX_FILE = "index.json"


@dataclass
class CacheSettings:
    """What a cache was built with; a cache folder only ever holds one setting."""

    teacher: str
    grid: int  # n: n x n point prompts
    tokens: int  # g: the student's token grid side
    dim: int  # requested projection dim (stored dim = min(dim, n*n))
    seed: int = 0
    size: Optional[int] = None  # the square size images are squashed to for the teacher (None = native)
    teacher_args: dict = field(default_factory=dict)
    version: int = CACHE_VERSION

    @property
    def stored_dim(self) -> int:
        return min(int(self.dim), int(self.grid) ** 2)


# ---------------------------------------------------------------------------------------------- compression

def projection_matrix(channels: int, dim: int, seed: int) -> Optional[torch.Tensor]:
    """The fixed `[channels, dim]` Gaussian projection (entries N(0, 1/dim)); None when dim >= channels."""
    if dim >= channels:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(channels, dim, generator=g, dtype=torch.float32) / float(dim) ** 0.5


def compress(tokens: torch.Tensor, projection: Optional[torch.Tensor]) -> torch.Tensor:
    """`[B, N, n*n]` fp32 token features -> `[B, N, dim]` fp16 (projected unless `projection` is None)."""
    out = tokens if projection is None else tokens @ projection
    return out.to(torch.float16)


def cosine_gram(tokens: torch.Tensor) -> torch.Tensor:
    """`[B, N, C]` -> `[B, N, N]` fp32 cosine similarities: stages.dense_losses.pairwise_similarity's convention
    (kept here so the cache command does not import the stages package and Lightning; a test pins the two)."""
    t = torch.nn.functional.normalize(tokens.float(), dim=-1, eps=1e-6)
    return t @ t.transpose(1, 2)


def similarity_error(full: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """`|S_full - S_stored|` over the off-diagonal token pairs of every image: a flat fp32 tensor."""
    diff = (cosine_gram(full) - cosine_gram(stored.float())).abs()
    off = ~torch.eye(diff.shape[-1], dtype=torch.bool)
    return diff[:, off].reshape(-1)


def effective_rank(tokens: torch.Tensor) -> torch.Tensor:
    """`[B, N, C]` -> `[B]`: exp(entropy of the normalised singular values) of each image's cosine Gram matrix."""
    sv = torch.linalg.svdvals(cosine_gram(tokens).double())
    p = sv / sv.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.exp(-(p * p.clamp_min(1e-30).log()).sum(-1)).float()


class RankStats:
    """Streaming mean, min and max of per-image effective ranks."""

    def __init__(self):
        self.total, self.count, self.low, self.high = 0.0, 0, float("inf"), 0.0

    def update(self, ranks: torch.Tensor) -> None:
        if ranks.numel():
            self.total += float(ranks.double().sum())
            self.count += int(ranks.numel())
            self.low, self.high = min(self.low, float(ranks.min())), max(self.high, float(ranks.max()))

    def summary(self) -> dict:
        return {"mean": self.total / max(self.count, 1), "min": self.low if self.count else 0.0,
                "max": self.high, "images": self.count}


class ErrorStats:
    """Streaming summary of similarity errors: mean, RMS, max and the 99th percentile (from a histogram of
    `bins` bins over [0, 2], the range of a cosine difference: resolution 2 / bins = 1e-4)."""

    def __init__(self, bins: int = 20000):
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.total = self.total_sq = self.worst = 0.0
        self.pairs = 0

    def update(self, errors: torch.Tensor) -> None:
        if not errors.numel():
            return
        e = errors.double()
        self.total += float(e.sum())
        self.total_sq += float((e * e).sum())
        self.worst = max(self.worst, float(e.max()))
        self.pairs += int(e.numel())
        self.hist += torch.histc(errors.float(), bins=self.bins, min=0.0, max=2.0).double()

    def quantile(self, q: float) -> float:
        if not self.pairs:
            return 0.0
        cdf = torch.cumsum(self.hist, 0)
        i = int(torch.searchsorted(cdf, torch.tensor(q * self.pairs, dtype=torch.float64)))
        return min((i + 1) * 2.0 / self.bins, self.worst)  # the bin's upper edge

    def summary(self) -> dict:
        n = max(self.pairs, 1)
        return {"mean_abs": self.total / n, "rms": (self.total_sq / n) ** 0.5, "p99": self.quantile(0.99),
                "max": self.worst, "pairs": self.pairs}


# ---------------------------------------------------------------------------------------------- atomic files

def _atomic_write(path: Path, write) -> None:
    """`write(fileobj)` into a temp file beside `path`, flush + fsync, os.replace (pe_lightning.io)."""
    write_atomic(path, write)
    os.chmod(path, 0o644)  # mkstemp makes 0600; caches are read by other users and jobs


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _write_tar(f, members: Iterable[tuple[str, bytes]]) -> None:
    """Stream (name, bytes) members into a tar: a shard never sits in memory whole."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644  # fixed metadata: identical bytes on a rebuild
            tf.addfile(ti, io.BytesIO(data))


def _tar_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path, mode="r:") as tf:
        return {ti.name: (ti.offset_data, ti.size) for ti in tf.getmembers()}


# ---------------------------------------------------------------------------------------------- ranks

def resolve_rank(rank: Optional[int] = None, world: Optional[int] = None) -> tuple[int, int]:
    """(rank, world): explicit arguments, else torch.distributed, else RANK / WORLD_SIZE, else (0, 1)."""
    if rank is None or world is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not (world >= 1 and 0 <= rank < world):
        raise DataError(f"teacher cache: rank {rank} is not in [0, world={world})")
    return int(rank), int(world)


# ---------------------------------------------------------------------------------------------- building

def _shard_stem(url: str) -> str:
    name = os.path.basename(url)
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _stems(shards: Sequence[str]) -> list[str]:
    stems = [_shard_stem(s) for s in shards]
    seen: dict[str, str] = {}
    for stem, src in zip(stems, shards):
        if stem in seen:
            raise DataError(f"teacher cache: source shards {seen[stem]} and {src} share the name {stem}.tar; "
                            "build one cache folder per source folder")
        seen[stem] = src
    return stems


def _check_settings(out: Path, settings: CacheSettings, shards: list[str]) -> None:
    path = out / SETTINGS_FILE
    want = {"settings": asdict(settings), "sources": shards}
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            diff = [k for k in want["settings"] if have.get("settings", {}).get(k) != want["settings"][k]]
            what = f"settings {diff}" if diff else "source shards"
            raise DataError(f"{out} holds a teacher cache built with other {what}; use another --out, or "
                            f"delete {out} to rebuild it")
        return
    _write_json(path, want)


def _shard_done(out: Path, stem: str) -> bool:
    meta, tar = out / f"{stem}.json", out / f"{stem}.tar"
    try:
        rec = json.loads(meta.read_text())
        return tar.is_file() and tar.stat().st_size == int(rec["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _instance_extra(raw: dict) -> torch.Tensor:
    if MASK_EXT not in raw:
        raise SkipSample("missing_mask", raw["__key__"])
    try:
        return torch.from_numpy(decode_mask(raw[MASK_EXT]).astype(np.int64))
    except Exception as e:  # a corrupt mask is a bad sample, never a dead run
        raise SkipSample("bad_mask", f"{raw['__key__']}: {type(e).__name__}: {e}") from None


# the per-sample inputs a teacher may ask for (MaskLogitTeacher.extras), read from the raw sample
EXTRA_READERS = {"instance": _instance_extra}


def _decoded_samples(url: str, settings: CacheSettings, needs: Sequence[str],
                     errors: dict) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """(key, image [3, S, S] in the eval normalisation, extras) for every usable sample of one shard."""

    def on_error(reason: str, detail: str) -> None:
        errors[reason] = errors.get(reason, 0) + 1
        log.warning("teacher cache: %s: %s", reason, detail)

    for raw in iter_tar_samples(url, on_error):
        try:
            img = decode_image(raw)
            extras = {name: EXTRA_READERS[name](raw) for name in needs}
        except SkipSample as e:
            errors[e.reason] = errors.get(e.reason, 0) + 1
            continue
        size = settings.size or (img.width if img.width == img.height else max(img.size))
        yield raw["__key__"], eval_transform(img, int(size)), extras


def _batches(samples: Iterable, batch_size: int) -> Iterator[list]:
    """Consecutive samples whose image and extras shapes agree (so they stack), at most batch_size at a time."""

    def shapes(sample) -> tuple:
        return tuple(sample[1].shape), tuple(sorted((k, tuple(v.shape)) for k, v in sample[2].items()))

    batch: list = []
    for s in samples:
        if batch and (len(batch) == batch_size or shapes(batch[0]) != shapes(s)):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def _stack_extras(batch: list) -> dict:
    return {name: torch.stack([s[2][name] for s in batch]) for name in batch[0][2]}


def _teacher_members(teacher: MaskLogitTeacher, url: str, settings: CacheSettings,
                     projection: Optional[torch.Tensor], batch_size: int, keys: list[str], errors: dict,
                     stats: ErrorStats, ranks: Optional["RankStats"] = None) -> Iterator[tuple[str, bytes]]:
    """The cache members of one source shard, batch by batch; fills keys, skip counters and error stats."""
    g = settings.tokens
    for batch in _batches(_decoded_samples(url, settings, teacher.extras, errors), batch_size):
        images = torch.stack([s[1] for s in batch])
        logits = teacher(images, out_size=(g, g), **_stack_extras(batch))  # [B, n*n, g, g]
        full = logits.flatten(2).transpose(1, 2).float()  # [B, g*g, n*n]
        stored = compress(full, projection)  # [B, g*g, dim] fp16
        stats.update(similarity_error(full, stored))
        if ranks is not None:
            ranks.update(effective_rank(full))
        for (key, _, _), arr in zip(batch, stored.reshape(len(batch), g, g, -1).numpy()):
            keys.append(key)
            yield f"{key}.{MEMBER_EXT}", _npy_bytes(np.ascontiguousarray(arr))


def _build_shard(teacher: MaskLogitTeacher, url: str, stem: str, out: Path, settings: CacheSettings,
                 projection: Optional[torch.Tensor], batch_size: int) -> dict:
    t0 = time.monotonic()
    for stale in out.glob(f".{stem}.tar.*.tmp"):  # left by a killed run on this shard
        stale.unlink(missing_ok=True)
    keys: list[str] = []
    errors: dict[str, int] = {}
    stats, ranks = ErrorStats(), RankStats()
    tar_path = out / f"{stem}.tar"
    members = _teacher_members(teacher, url, settings, projection, batch_size, keys, errors, stats, ranks)
    _atomic_write(tar_path, lambda f: _write_tar(f, members))
    offsets = _tar_offsets(tar_path)
    seconds = time.monotonic() - t0
    g = settings.tokens
    rec = {
        "source": url,
        "shard": tar_path.name,
        "count": len(keys),
        "bytes": tar_path.stat().st_size,
        "keys": keys,
        "offsets": [offsets[f"{k}.{MEMBER_EXT}"][0] for k in keys],
        "nbytes": [offsets[f"{k}.{MEMBER_EXT}"][1] for k in keys],
        "shape": [g, g, settings.stored_dim],
        "dtype": "float16",
        "similarity_error": stats.summary(),
        "target_effective_rank": ranks.summary(),
        "skipped": errors,
        "seconds": seconds,
        "images_per_s": len(keys) / seconds if seconds > 0 else None,
    }
    _write_json(out / f"{stem}.json", rec)
    return rec


def write_index(out: str | Path) -> dict:
    """Summarise every finished shard of the cache in `out` into index.json (atomic) and return it."""
    out = Path(out)
    info = json.loads((out / SETTINGS_FILE).read_text())
    shards, missing = [], []
    abs_sum = sq_sum = 0.0
    err_max, p99, pairs, count, seconds = 0.0, 0.0, 0, 0, 0.0
    rank_sum, rank_n, rank_min, rank_max = 0.0, 0, float("inf"), 0.0
    for src in info["sources"]:
        stem = _shard_stem(src)
        if not _shard_done(out, stem):
            missing.append(f"{stem}.tar")
            continue
        rec = json.loads((out / f"{stem}.json").read_text())
        e = rec["similarity_error"]
        shards.append({"shard": rec["shard"], "source": src, "count": rec["count"], "bytes": rec["bytes"],
                       "similarity_error": e, "skipped": rec["skipped"], "seconds": rec["seconds"]})
        abs_sum += e["mean_abs"] * e["pairs"]
        sq_sum += e["rms"] ** 2 * e["pairs"]
        err_max, p99, pairs = max(err_max, e["max"]), max(p99, e["p99"]), pairs + e["pairs"]
        count, seconds = count + rec["count"], seconds + rec["seconds"]
        r = rec.get("target_effective_rank")  # absent from shards built before it was measured
        if r and r.get("images"):
            rank_sum, rank_n = rank_sum + r["mean"] * r["images"], rank_n + r["images"]
            rank_min, rank_max = min(rank_min, r["min"]), max(rank_max, r["max"])
    index = {
        **info["settings"],
        "stored_dim": CacheSettings(**info["settings"]).stored_dim,
        "complete": not missing,
        "missing": missing,
        "samples": count,
        "similarity_error": {"mean_abs": abs_sum / max(pairs, 1), "rms": (sq_sum / max(pairs, 1)) ** 0.5,
                             "p99_worst_shard": p99, "max": err_max, "pairs": pairs},
        "target_effective_rank": {"mean": rank_sum / rank_n if rank_n else None,
                                  "min": rank_min if rank_n else None, "max": rank_max if rank_n else None,
                                  "images": rank_n},
        "images_per_s": count / seconds if seconds > 0 else None,
        "shards": shards,
    }
    _write_json(out / INDEX_FILE, index)
    return index


def build_cache(teacher: MaskLogitTeacher, data: str | Sequence[str], out: str | Path, tokens: int,
                dim: int = 128, seed: int = 0, size: Optional[int] = None, batch_size: int = 16,
                rank: Optional[int] = None, world: Optional[int] = None,
                teacher_args: Optional[dict] = None) -> dict:
    """Build (or finish) the cache of `teacher` for the shards `data` in `out`; returns this rank's summary.

    Args:
        teacher: a MaskLogitTeacher (its `grid` is the prompt grid n).
        data: the source shards (anything `expand_shards` takes).
        out: the cache folder (created).
        tokens: the student's token grid side g (e.g. 8 for the tiny preset at 64 px).
        dim: projection dim (stored dim = min(dim, n*n)); seed: the projection's seed.
        size: square size images are squashed to before the teacher (None = their native size).
        rank, world: this process's share (see `resolve_rank`).
        teacher_args: the teacher's build arguments, recorded in cache.json (a cache holds one setting).
    """
    shards = [os.path.abspath(s) for s in expand_shards(data, what="teacher --data")]
    stems = _stems(shards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = CacheSettings(teacher=teacher.name, grid=teacher.grid, tokens=int(tokens), dim=int(dim),
                             seed=int(seed), size=size, teacher_args=dict(teacher_args or {}))
    _check_settings(out, settings, shards)
    unknown = [n for n in teacher.extras if n not in EXTRA_READERS]
    if unknown:
        raise DataError(f"teacher {teacher.name} needs per-sample inputs {unknown} the cache cannot read "
                        f"(known: {sorted(EXTRA_READERS)})")
    rank, world = resolve_rank(rank, world)
    projection = projection_matrix(teacher.grid ** 2, settings.dim, settings.seed)
    built, skipped, images, t0 = [], 0, 0, time.monotonic()
    for i, (url, stem) in enumerate(zip(shards, stems)):
        if i % world != rank:
            continue
        if _shard_done(out, stem):
            skipped += 1
            continue
        rec = _build_shard(teacher, url, stem, out, settings, projection, batch_size)
        built.append(rec["shard"])
        images += rec["count"]
        e = rec["similarity_error"]
        log.info("teacher cache: %s: %d samples in %.1f s (%.1f img/s), similarity error mean %.4f max %.4f",
                 rec["shard"], rec["count"], rec["seconds"], rec["images_per_s"] or 0.0, e["mean_abs"], e["max"])
    seconds = time.monotonic() - t0
    _barrier()
    index = write_index(out) if rank == 0 or not _distributed() else None
    return {"rank": rank, "world": world, "built": built, "skipped": skipped, "images": images,
            "seconds": seconds, "images_per_s": images / seconds if images and seconds > 0 else None,
            "index": index}


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------- reading

class TeacherCache:
    """Read a teacher cache: `TeacherCache(dir).lookup(keys, flip=None) -> [B, g*g, dim]` float32 targets.

    Opening checks every shard the cache was built for: a missing shard, a missing record or a truncated
    tar is a DataError naming the shard and the fix. `flip`: None, one bool, or one bool per key; a flipped
    key's token grid is mirrored left-right (follows a horizontally flipped training image).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        settings_file = self.path / SETTINGS_FILE
        if not settings_file.is_file():
            raise DataError(f"{self.path} is not a teacher cache (no {SETTINGS_FILE}); build it with "
                            f"`pe-lightning teacher oracle|sam --data SHARDS --out {self.path}`")
        info = json.loads(settings_file.read_text())
        self.settings = CacheSettings(**info["settings"])
        self.shards: list[Path] = []
        self._where: dict[str, tuple[int, int, int]] = {}  # key -> (shard index, offset, nbytes)
        for src in info["sources"]:
            self._open_shard(src)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @property
    def tokens(self) -> int:
        return self.settings.tokens

    @property
    def dim(self) -> int:
        return self.settings.stored_dim

    def _fix(self) -> str:
        return (f"rerun `pe-lightning teacher {self.settings.teacher} --data ... --out {self.path}` with the same "
                "settings to rebuild it (finished shards are skipped)")

    def _open_shard(self, src: str) -> None:
        stem = _shard_stem(src)
        tar, meta = self.path / f"{stem}.tar", self.path / f"{stem}.json"
        if not tar.is_file() or not meta.is_file():
            raise DataError(f"teacher cache shard {tar} is missing (cache of {src}); {self._fix()}")
        try:
            rec = json.loads(meta.read_text())
            want = int(rec["bytes"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"teacher cache record {meta} is unreadable ({e}); delete it and {self._fix()}") from None
        have = tar.stat().st_size
        if have != want:
            raise DataError(f"teacher cache shard {tar} is truncated or corrupt ({have} bytes, recorded {want}); "
                            f"delete it and {self._fix()}")
        idx = len(self.shards)
        self.shards.append(tar)
        for key, off, nb in zip(rec["keys"], rec["offsets"], rec["nbytes"]):
            if key in self._where:
                other = self.shards[self._where[key][0]]
                raise DataError(f"teacher cache: sample key {key!r} is in both {other} and {tar}; sample keys must "
                                "be unique across the source shards")
            self._where[key] = (idx, int(off), int(nb))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getstate__(self) -> dict:  # DataLoader workers reopen their own file descriptors
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def _fd(self, idx: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if idx not in self._fds:
            self._fds[idx] = os.open(self.shards[idx], os.O_RDONLY)
        return self._fds[idx]

    def get(self, key: str) -> np.ndarray:
        """One sample's stored `[g, g, dim]` fp16 array."""
        if key not in self._where:
            raise DataError(f"teacher cache {self.path} has no entry for sample {key!r} (skipped when the cache was "
                            "built, or the data changed since); rebuild the cache for this data")
        idx, off, nb = self._where[key]
        data = os.pread(self._fd(idx), nb, off)
        try:
            if len(data) != nb:
                raise ValueError(f"read {len(data)} of {nb} bytes")
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise DataError(f"teacher cache shard {self.shards[idx]} is corrupt at sample {key!r} ({e}); delete it "
                            f"and {self._fix()}") from None

    def lookup(self, keys: Sequence[str], flip: Optional[bool | Sequence[bool]] = None) -> torch.Tensor:
        """`[B, g*g, dim]` float32 token targets (row-major token grid), mirrored where `flip` says so."""
        flips = [bool(flip)] * len(keys) if flip is None or isinstance(flip, bool) else [bool(f) for f in flip]
        if len(flips) != len(keys):
            raise ValueError(f"lookup: {len(keys)} keys but {len(flips)} flip flags")
        if not keys:
            return torch.zeros(0, self.tokens * self.tokens, self.dim)
        out = torch.from_numpy(np.stack([self.get(k) for k in keys])).float()  # [B, g, g, dim]
        if any(flips):
            sel = torch.tensor(flips)
            out[sel] = out[sel].flip(2)  # mirror the x axis of the token grid
        return out.flatten(1, 2)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
