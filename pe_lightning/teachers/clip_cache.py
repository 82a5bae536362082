"""The teacher-embedding cache of the distill stage: a frozen CLIP teacher's image and text embeddings,
precomputed per source shard, replayed with the augmentation they were computed on (MobileCLIP's idea).

Why the augmentation must be stored: the train augmentation is a pure function of (seed, global sample
index), but with resampled shards one sample appears at many indices. So each sample K gets
`num_augmentations` (N) augmentations of its own, and at train time the decoder picks one of them per
appearance (`CachedImageTextDecoder` in pe_lightning/data/cached_image_text.py):

    params of augmentation j of sample K = TrainTransform.sample(augmentation_rng(seed, K, j), W, H)
        augmentation_rng(seed, K, j) = PCG64(derive_seed(seed, TAG_AUG, key_hash(K), j))
        key_hash(K)                  = the first 63 bits of blake2b(K as UTF-8)
        W, H                         = the source image's size as stored (before any JPEG draft)
    j at global sample index i      = augmentation_choice(seed, i, N) = derive_seed(seed, TAG_PICK, i) mod N

The drawn parameters are stored next to the embeddings and the decoder replays the **stored** ones, so the
pixels it emits and the cached embedding come from the same crop / jitter / flip (a crop box is in source
pixels; it is rescaled only when an image is decoded at another size, i.e. a JPEG draft).

Layout of a cache folder DIR (built by `pe-lightning teacher clip --data SHARDS --out DIR ...`):

    DIR/teacher_clip.json              manifest: format, version, params, teacher logit scale, shards done
    DIR/<shard stem>.teacher-clip.pt   one per source shard (keyed by the shard's file name, so one folder
                                       serves one set of uniquely named shards), a torch file holding
        format, version, params        as the manifest (every file is self-describing)
        shard {name, bytes}            the source shard's file name and size in bytes (stale-cache check)
        keys        list[str]          sample keys (`__key__`), in shard order; skipped samples are absent
        source_size long  [n, 2]       (width, height) of each source image
        aug         float64 [n, N, 7]  left, top, right, bottom (source pixels), brightness, saturation, flip
        image       [n, N, D]          teacher.encode_image of augmentation j, **un-normalised**, at the
                                       teacher's own resolution `teacher_image_size`
        text        [n, 2, D]          teacher.encode_text, un-normalised, of [caption, swap_left_right(caption)]
                                       (the decoder emits the swapped caption when the augmentation flips)
        skipped     dict[str, int]     samples left out, per reason (bad_image, empty_caption, tar_error, ...)

Every file is written atomically (temp file, fsync, rename); building is resumable shard by shard: a
present file that reads back with the same params and the source shard's current size is kept, anything
else (missing, truncated, stale) is rebuilt. `params` holds everything the embeddings depend on: the
teacher (a fingerprint of its weights file), its preset, resolution and context length, the seed, N, the
augmentation config, the embedding width and the storage dtype. Embeddings are stored in float32 by
default (float16 halves the disk; our choice to keep exactness by default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from pe_lightning.data.config import AugmentConfig
from pe_lightning.data.image_text import decode_caption, decode_image
from pe_lightning.data.shards import DataError, SkipSample, is_remote, iter_tar_samples
from pe_lightning.data.transforms import AugParams, TrainTransform, derive_seed, swap_left_right
from pe_lightning.io import torch_save_atomic, write_text_atomic

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT", "CACHE_VERSION", "MANIFEST", "SUFFIX", "TeacherCacheError", "CacheParams", "CacheShard",
    "key_hash", "augmentation_rng", "augmentation_choice", "draw_augmentations", "pack_params",
    "unpack_params", "augment_dict", "teacher_fingerprint", "cache_path", "read_manifest", "read_cache_shard",
    "check_params", "build_clip_cache",
]

CACHE_FORMAT = "pe-lightning/teacher-clip-cache"
CACHE_VERSION = 1
MANIFEST = "teacher_clip.json"
SUFFIX = ".teacher-clip.pt"
TAG_AUG, TAG_PICK = 0x7EA0, 0x7EA1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REBUILD_HINT = "rerun `pe-lightning teacher clip` with the same arguments (it rebuilds only what is missing or bad)"


class TeacherCacheError(DataError):
    """A teacher cache that is missing, unreadable, stale or built with other settings than the run's."""


# ----------------------------------------------------------------------------------------------------------
# parameters

def augment_dict(augment: Any) -> dict:
    """An AugmentConfig (dataclass, OmegaConf node, dict or anything with its keys) -> a plain, typed dict."""
    if dataclasses.is_dataclass(augment):
        d = dataclasses.asdict(augment)
    elif isinstance(augment, dict):
        d = dict(augment)
    else:
        d = {f.name: getattr(augment, f.name) for f in dataclasses.fields(AugmentConfig)}
    out = {}
    for f in dataclasses.fields(AugmentConfig):
        v = d.get(f.name, f.default)
        out[f.name] = bool(v) if f.name == "enabled" else float(v)
    return out


@dataclass(frozen=True)
class CacheParams:
    """Everything a cached embedding depends on (the decoder refuses a cache whose params differ)."""

    teacher: str  # fingerprint of the teacher's weights (teacher_fingerprint)
    model: str  # the teacher's preset
    teacher_image_size: int  # the teacher's input resolution (the student's may differ)
    context_length: int  # the teacher's tokenizer length
    seed: int
    num_augmentations: int
    augment: dict  # augment_dict(AugmentConfig)
    embed_dim: int
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CacheParams":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_params(found: dict, expected: dict, where: str) -> None:
    """Raise TeacherCacheError naming every field of `expected` that differs in `found`."""
    diffs = []
    for k, want in expected.items():
        have = found.get(k)
        if k == "augment" and have is not None:
            have, want = augment_dict(have), augment_dict(want)
        if have != want:
            diffs.append(f"{k}: cache {have!r}, run {want!r}")
    if diffs:
        raise TeacherCacheError(
            f"teacher cache {where} was built with other settings ({'; '.join(diffs)}); rebuild it with the "
            "run's settings (`pe-lightning teacher clip ...` into another --out) or point the run at the cache "
            "built for them")


def teacher_fingerprint(path: str | os.PathLike) -> str:
    """A fast fingerprint of a weights file: blake2b of its size, first and last MiB and 64 evenly spaced
    64 KiB blocks (our choice: reading a 5 GB G file whole on every start is too slow; weights that differ
    differ everywhere, so sampling tells two trainings apart)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights not found: {path}")
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        spots = [0, max(0, size - (1 << 20))] + [int(k * size / 64) for k in range(64)]
        for k, off in enumerate(spots):
            f.seek(off)
            h.update(f.read((1 << 20) if k < 2 else (1 << 16)))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# augmentations

def key_hash(key: str) -> int:
    """A stable 63-bit hash of a sample key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def augmentation_rng(seed: int, key: str, j: int) -> np.random.Generator:
    """The generator of augmentation j of sample `key`."""
    return np.random.Generator(np.random.PCG64(derive_seed(seed, TAG_AUG, key_hash(key), j)))


def augmentation_choice(seed: int, index: int, n: int) -> int:
    """Which of the n stored augmentations the sample at global index `index` uses (pure function)."""
    return derive_seed(seed, TAG_PICK, index) % int(n)


def draw_augmentations(transform: TrainTransform, seed: int, key: str, width: int, height: int,
                       n: int) -> list[AugParams]:
    return [transform.sample(augmentation_rng(seed, key, j), width, height) for j in range(n)]


def pack_params(p: AugParams) -> list[float]:
    return [*p.box, p.brightness, p.saturation, float(p.flip)]


def unpack_params(row: Sequence[float], source_size: Sequence[int], image_size: Sequence[int]) -> AugParams:
    """A stored row -> AugParams for the image as decoded (`image_size` (w, h)); the box is rescaled only
    when that differs from the stored `source_size` (a JPEG draft)."""
    box = tuple(float(v) for v in row[:4])
    (sw, sh), (w, h) = (int(v) for v in source_size), (int(v) for v in image_size)
    if (sw, sh) != (w, h):
        fx, fy = w / sw, h / sh
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    return AugParams(box=box, brightness=float(row[4]), saturation=float(row[5]), flip=bool(row[6] >= 0.5))


def source_size(raw: dict, exts: Iterable[str] = ("jpg", "jpeg", "png", "webp")) -> tuple[int, int]:
    """(width, height) of the sample's image from its header (no decoding, no draft)."""
    import io

    data = next(raw[e] for e in exts if e in raw)
    with Image.open(io.BytesIO(data)) as img:
        return img.size


# ----------------------------------------------------------------------------------------------------------
# reading

def cache_path(cache_dir: str | os.PathLike, shard_url: str) -> Path:
    name = os.path.basename(shard_url)
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return Path(cache_dir) / f"{name}{SUFFIX}"


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    """The manifest of a cache folder: {"format", "version", "params", "teacher_logit_scale", "shards"}."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise TeacherCacheError(
            f"no teacher cache at {cache_dir} ({MANIFEST} missing); build it with "
            "`pe-lightning teacher clip --data SHARDS --out DIR --weights TEACHER.pt --model PRESET`")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TeacherCacheError(f"cannot read {path} ({type(e).__name__}: {e}); {REBUILD_HINT}") from e
    if m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
        raise TeacherCacheError(f"{path} is not a version-{CACHE_VERSION} teacher CLIP cache "
                                f"(format {m.get('format')!r}, version {m.get('version')!r}); rebuild it")
    return m


class CacheShard:
    """One loaded cache file (tensors memory-mapped): rows by sample key."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.params: dict = data["params"]
        self.shard: dict = data["shard"]
        self.keys: list[str] = list(data["keys"])
        self.source_size: torch.Tensor = data["source_size"]
        self.aug: torch.Tensor = data["aug"]
        self.image: torch.Tensor = data["image"]
        self.text: torch.Tensor = data["text"]
        self.skipped: dict = dict(data.get("skipped", {}))
        self.rows = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: str) -> int:
        try:
            return self.rows[key]
        except KeyError:
            raise TeacherCacheError(
                f"teacher cache {self.path} has no entry for sample {key!r} of shard {self.shard.get('name')}: the "
                f"shard changed since the cache was built; delete {self.path} and {REBUILD_HINT}") from None


def read_cache_shard(path: str | os.PathLike, expected: Optional[dict] = None,
                     shard_url: Optional[str] = None) -> CacheShard:
    """Load and check one cache file. `expected`: params that must match (check_params); `shard_url`: the
    source shard it must belong to (its file name, and its size in bytes when it is a local file)."""
    path = Path(path)
    what = f" (the cache of shard {shard_url})" if shard_url else ""
    if not path.is_file():
        raise TeacherCacheError(f"teacher cache file {path} is missing{what}; {REBUILD_HINT}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        shard = CacheShard(path, data)
        n, N = len(shard.keys), int(shard.params["num_augmentations"])
        dim = int(shard.params["embed_dim"])
        shapes_ok = (tuple(shard.image.shape) == (n, N, dim) and tuple(shard.text.shape) == (n, 2, dim)
                     and tuple(shard.aug.shape) == (n, N, 7) and tuple(shard.source_size.shape) == (n, 2))
    except Exception as e:  # torn, truncated, not a torch file, missing entries
        raise TeacherCacheError(f"teacher cache file {path} is truncated or corrupt ({type(e).__name__}: {e}); "
                                f"delete it and {REBUILD_HINT}") from None
    if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION or not shapes_ok:
        raise TeacherCacheError(f"teacher cache file {path} is not a consistent version-{CACHE_VERSION} cache file; "
                                f"delete it and {REBUILD_HINT}")
    if expected:
        check_params(shard.params, expected, str(path))
    if shard_url is not None:
        name = os.path.basename(shard_url)
        if shard.shard.get("name") != name:
            raise TeacherCacheError(f"teacher cache file {path} belongs to shard {shard.shard.get('name')!r}, not "
                                    f"{name!r}; give each source its own cache folder")
        size = _shard_bytes(shard_url)
        if size is not None and shard.shard.get("bytes") not in (None, size):
            raise TeacherCacheError(f"teacher cache file {path} was built from a {shard.shard.get('bytes')}-byte "
                                    f"{name}, which now has {size} bytes; delete {path} and {REBUILD_HINT}")
    return shard


def _shard_bytes(url: str) -> Optional[int]:
    return None if is_remote(url) else os.path.getsize(url)


# ----------------------------------------------------------------------------------------------------------
# building

@dataclass
class _Pending:
    key: str
    params: list[AugParams]  # the N views, for the image as decoded
    captions: tuple[str, str]


class _ShardBuilder:
    """Embeds one shard's samples in batches of about `batch_size` images."""

    def __init__(self, teacher: torch.nn.Module, transform: TrainTransform, tokenize: Any, params: CacheParams,
                 batch_size: int, device: torch.device, autocast: bool):
        self.teacher, self.transform, self.tokenize = teacher, transform, tokenize
        self.params, self.batch_size, self.device, self.autocast = params, batch_size, device, autocast
        self.dtype = DTYPES[params.dtype]

    def _forward(self, fn, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return fn(x.to(self.device, non_blocking=True)).float().cpu()

    def embed(self, group: list[tuple[_Pending, Image.Image]]) -> tuple[torch.Tensor, torch.Tensor]:
        N = self.params.num_augmentations
        distinct = self.transform.enabled  # disabled augmentation: N identical views, embed one
        views = [self.transform.apply(img, p) for s, img in group for p in (s.params if distinct else s.params[:1])]
        img_emb = self._forward(self.teacher.encode_image, torch.stack(views))
        img_emb = img_emb.view(len(group), N if distinct else 1, -1).expand(-1, N, -1)
        texts, slots = [], []
        for s, _ in group:
            a, b = s.captions
            slots.append((len(texts), len(texts) + (a != b)))
            texts.extend([a] if a == b else [a, b])
        txt_emb = self._forward(self.teacher.encode_text, torch.as_tensor(self.tokenize(texts), dtype=torch.long))
        txt = torch.stack([txt_emb[[i, j]] for i, j in slots])
        return img_emb.to(self.dtype).contiguous(), txt.to(self.dtype)

    def build(self, url: str) -> dict:
        skipped: Counter = Counter()
        keys, sizes, augs, images, texts = [], [], [], [], []
        group: list[tuple[_Pending, Image.Image]] = []
        per_group = max(1, self.batch_size // self.params.num_augmentations)
        draft = 2 * self.params.teacher_image_size if self.transform.enabled else None  # as ImageTextDecoder's

        def flush() -> None:
            if group:
                i, t = self.embed(group)
                images.append(i)
                texts.append(t)
                group.clear()

        seen = set()
        for raw in iter_tar_samples(url, lambda reason, detail: skipped.update([reason])):
            key = raw["__key__"]
            try:
                caption = decode_caption(raw)
                img = decode_image(raw, draft=draft)
            except SkipSample as e:
                skipped[e.reason] += 1
                continue
            if key in seen:  # the readers' lookup takes the first one
                skipped["duplicate_key"] += 1
                continue
            seen.add(key)
            w, h = source_size(raw)
            drawn = draw_augmentations(self.transform, self.params.seed, key, w, h, self.params.num_augmentations)
            keys.append(key)
            sizes.append([w, h])
            augs.append([pack_params(p) for p in drawn])
            # replayed from the stored rows exactly as the decoder will (rescaled to the decoded image)
            views = [unpack_params(row, (w, h), img.size) for row in augs[-1]]
            group.append((_Pending(key, views, (caption, swap_left_right(caption))), img))
            if len(group) >= per_group:
                flush()
        flush()
        dim, N = self.params.embed_dim, self.params.num_augmentations
        return {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "params": self.params.to_dict(),
            "shard": {"name": os.path.basename(url), "bytes": _shard_bytes(url)},
            "keys": keys,
            "source_size": torch.tensor(sizes, dtype=torch.long).view(-1, 2),
            "aug": torch.tensor(augs, dtype=torch.float64).view(-1, N, 7),
            "image": torch.cat(images) if images else torch.empty(0, N, dim, dtype=self.dtype),
            "text": torch.cat(texts) if texts else torch.empty(0, 2, dim, dtype=self.dtype),
            "skipped": dict(skipped),
        }


def _write_manifest(out: Path, params: CacheParams, logit_scale: Optional[float], shards: dict) -> None:
    write_text_atomic(out / MANIFEST, json.dumps({
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "params": params.to_dict(),
        "teacher_logit_scale": logit_scale, "shards": shards}, indent=1, sort_keys=True))


def build_clip_cache(shards: Sequence[str], out_dir: str | os.PathLike, teacher: torch.nn.Module, *,
                     teacher_id: str, model: str, seed: int, num_augmentations: int, augment: Any = None,
                     image_size: Optional[int] = None, dtype: str = "float32", batch_size: int = 256,
                     device: str | torch.device = "cpu", bf16: bool = False) -> dict:
    """Build (or complete) the cache of `shards` in `out_dir` with the frozen `teacher` (a PECLIP).

    Args:
        teacher_id: the teacher's fingerprint (`teacher_fingerprint(weights)`), recorded in the params.
        model: the teacher's preset name (recorded). seed: the training run's seed.
        num_augmentations: N stored augmentations per sample (MobileCLIP used 10 to 30).
        augment: the run's `data.augment` (AugmentConfig or dict; default AugmentConfig()).
        image_size: the teacher's input resolution (default: its native `vision.image_size`).
        dtype: storage dtype of the embeddings (float32 | float16 | bfloat16).
        batch_size: images per teacher forward. device / bf16: where and how the teacher runs.
    Returns {"built": [names], "kept": [names], "samples": n built, "images": views embedded, "seconds"}.
    Raises TeacherCacheError when `out_dir` holds a cache with other params or two shards share a name.
    """
    from pe_lightning.models.tokenizer import get_tokenizer

    if int(num_augmentations) < 1:
        raise TeacherCacheError(f"num_augmentations must be >= 1, got {num_augmentations}")
    if dtype not in DTYPES:
        raise TeacherCacheError(f"teacher cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    names = [os.path.basename(u) for u in shards]
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise TeacherCacheError(f"teacher cache: several shards are named {dup[0]} (a cache file is keyed by the "
                                "shard's file name); build one cache folder per source")
    teacher_cfg = teacher.cfg
    if teacher_cfg.text is None:
        raise TeacherCacheError(f"teacher {model!r} has no text tower: the CLIP cache needs a PE-Core (CLIP) teacher")
    params = CacheParams(
        teacher=str(teacher_id), model=str(model),
        teacher_image_size=int(image_size or teacher_cfg.vision.image_size),
        context_length=int(teacher_cfg.text.context_length),
        seed=int(seed), num_augmentations=int(num_augmentations), augment=augment_dict(augment or AugmentConfig()),
        embed_dim=int(teacher_cfg.vision.output_dim), dtype=dtype)
    if params.teacher_image_size % teacher_cfg.vision.patch_size:
        raise TeacherCacheError(f"teacher image size {params.teacher_image_size} is not a multiple of its patch size "
                                f"{teacher_cfg.vision.patch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: dict = {}
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        check_params(m["params"], params.to_dict(), f"folder {out}")
        done = dict(m.get("shards") or {})
    logit_scale = float(teacher.logit_scale.detach()) if getattr(teacher, "logit_scale", None) is not None else None
    _write_manifest(out, params, logit_scale, done)

    dev = torch.device(device)
    teacher = teacher.eval().to(dev)
    builder = _ShardBuilder(teacher, TrainTransform(AugmentConfig(**params.augment), params.teacher_image_size),
                            get_tokenizer(params.context_length), params, int(batch_size), dev,
                            autocast=bool(bf16) and dev.type == "cuda")
    summary: dict = {"built": [], "kept": [], "samples": 0, "images": 0, "seconds": 0.0}
    t_all = time.perf_counter()
    for i, url in enumerate(shards, 1):
        path = cache_path(out, url)
        if path.exists():
            try:
                read_cache_shard(path, params.to_dict(), url)
                summary["kept"].append(names[i - 1])
                continue
            except TeacherCacheError as e:
                log.warning("teacher cache: rebuilding %s: %s", path.name, e)
        t0 = time.perf_counter()
        data = builder.build(url)
        torch_save_atomic(data, path)
        n = len(data["keys"])
        views = n * (params.num_augmentations if builder.transform.enabled else 1)
        dt = time.perf_counter() - t0
        done[names[i - 1]] = {"samples": n, "skipped": data["skipped"]}
        _write_manifest(out, params, logit_scale, done)
        summary["built"].append(names[i - 1])
        summary["samples"] += n
        summary["images"] += views
        log.info("teacher cache %d/%d: %s, %d samples x %d views in %.1fs (%.0f images/s)%s", i, len(shards),
                 path.name, n, params.num_augmentations, dt, views / max(dt, 1e-9),
                 f", skipped {data['skipped']}" if data["skipped"] else "")
    summary["seconds"] = time.perf_counter() - t_all
    return summary
