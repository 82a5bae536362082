"""Write the shapes world as webdataset shards in the formats the real readers take.

Layout under ROOT (all sample counts configurable; defaults for train = 20000):
```
ROOT/manifest.json                     splits, counts, classes, held-out pairs, seed, size, version
ROOT/.complete                         written last (generation happens in a tmp dir renamed into place)
ROOT/train/{00000..}.tar + sizes.json  image-text, img2dataset style: KEY.png KEY.txt KEY.json KEY.mask.png
ROOT/retrieval/                        CLIP_benchmark retrieval layout: dataset_type.txt, test/nshards.txt,
                                       test/{0..}.tar (KEY.png KEY.txt KEY.json KEY.mask.png), held out from train
ROOT/zeroshot/heldout_classes.txt      the 6 held-out "colour shape" class names
ROOT/zeroshot/{test,outline,texture,noise}/  CLIP_benchmark classification layout each: classnames.txt,
                                       zeroshot_classification_templates.txt, heldout_classes.txt,
                                       test/nshards.txt, test/{0..}.tar (KEY.png KEY.cls KEY.txt KEY.json KEY.mask.png)
ROOT/video/{train,test}/{00000..}.tar + sizes.json   video2dataset style: KEY.mp4 KEY.txt KEY.json
ROOT/instruct/{00000..}.tar + sizes.json             KEY.png KEY.json (list of {question, answer}) KEY.txt
ROOT/instruct_test/{00000..}.tar + sizes.json        the same for held-out scenes (the language stage's eval)
ROOT/zeroshot/test/train/                            a labelled train split of the solid set (probe training;
                                       CLIP_benchmark's train/test layout), `probe_per_class` images per class
ROOT/dense/{train,test}/                             world version 2 only: the dense-probe split, CLIP_benchmark
                                       layout (classnames.txt, templates in ROOT/dense), 3-5 objects of distinct
                                       shapes per scene (KEY.png KEY.cls KEY.txt KEY.json KEY.mask.png)
```
World version 2 (`world=2`, recipe key data.shapes_version, CLI --version; world2.py) changes the scenes, captions,
QA and adds the dense split; version 1 (the default) is written exactly as before, manifest and marker included.
Every sample is a pure function of (seed, split, index), so shards are byte-identical for a seed whatever
the number of processes. Images are PNG: lossless, so colours are exact (a colour word is never blurred
into a neighbour hue by JPEG artefacts) and the masks line up with the pixels exactly.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from pe_lightning.data.shapes.captions import caption_scene
from pe_lightning.data.shapes.masks import MASK_EXT, encode_mask
from pe_lightning.data.shapes.motion import encode_mp4, render_clip, sample_clip
from pe_lightning.data.shapes.qa import scene_qa
from pe_lightning.data.shapes.render import render_scene
from pe_lightning.data.shapes.scenes import (ALL_PAIRS, a, CLASSES, COLOURS, HELDOUT, SHAPES, SIZES, TEMPLATES,
                                             heldout_classes, sample_scene, single_scene)
from pe_lightning.data.shapes.world2 import DENSE_N, SIZES2
from pe_lightning.data.shards import DataError
from pe_lightning.data.transforms import derive_seed

log = logging.getLogger(__name__)

VERSION = 3  # 2: 70% single-object train scenes (was 50%); 3: + instruct_test, zeroshot/test/train splits
MARKER = ".complete"
SPLIT_TAGS = {"train": 1, "retrieval": 2, "zs/test": 3, "zs/outline": 4, "zs/texture": 5, "zs/noise": 6,
              "video/train": 7, "video/test": 8, "instruct": 9, "instruct_test": 10, "zs/train": 11,
              "dense/train": 12, "dense/test": 13}
WORLDS = (1, 2)  # world versions: 1 = the default world (scenes.py ...), 2 = world2.py (#28), chosen by a key
ZS_STYLES = {"test": "solid", "outline": "outline", "texture": "texture", "noise": "noise"}


def default_counts(train: int, world: int = 1) -> dict[str, int]:
    counts = {"train": train, "retrieval": 1000, "zeroshot_per_class": 10, "video_train": max(64, train // 10),
              "video_test": max(32, train // 100), "instruct": max(64, train // 4),
              "instruct_test": max(32, train // 40), "probe_per_class": 20}
    if world == 2:  # the dense-probe split of multi-object scenes (its own train and test scenes)
        counts.update(dense_train=320, dense_test=160)
    return counts


def check_world(world: int) -> int:
    if int(world) not in WORLDS:
        raise ValueError(f"shapes world version must be one of {WORLDS}, got {world!r}")
    return int(world)


def _rng(seed: int, split: str, i: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, 0x5BA9E5, SPLIT_TAGS[split], i)))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def make_sample(split: str, i: int, seed: int, px: int, per_class: int = 10,
                world: int = 1) -> tuple[str, dict[str, bytes]]:
    """(key, {extension: bytes}) of sample i of a split."""
    if world == 2 and not split.startswith("video/"):
        return make_sample2(split, i, seed, px, per_class)
    rng = _rng(seed, split, i)
    key = f"{i:09d}"
    if split.startswith("video/"):
        clip = sample_clip(rng, px)
        caption = clip.caption()
        meta = {"key": key, "caption": caption, "status": "success", **clip.to_json()}
        return key, {"mp4": encode_mp4(render_clip(clip)), "txt": caption.encode(), "json": _json(meta)}
    if split.startswith("zs/"):
        label = i // per_class
        colour, shape = ALL_PAIRS[label]
        scene = single_scene(rng, px, colour, shape, style=ZS_STYLES.get(split[3:], "solid"))
        caption = a(f"{colour} {shape}") + "."
        extra = {"cls": str(label).encode()}
    else:
        scene = sample_scene(rng, px)
        caption = caption_scene(scene, rng)
        extra = {}
    img, mask = render_scene(scene, rng)
    meta = {"key": key, "caption": caption, "status": "success", "width": px, "height": px, **scene.to_json()}
    out = {"png": _png(img), "txt": caption.encode(), "json": _json(meta), MASK_EXT: encode_mask(mask), **extra}
    if split in ("instruct", "instruct_test"):
        out = {"png": out["png"], "txt": out["txt"], "json": _json(scene_qa(scene, rng)),
               "objects.json": out["json"]}
    return key, out


def make_sample2(split: str, i: int, seed: int, px: int, per_class: int = 10) -> tuple[str, dict[str, bytes]]:
    """Sample i of a split of world version 2 (world2.py); its video clips are version 1's, at this size."""
    from pe_lightning.data.shapes import world2

    rng = _rng(seed, split, i)
    key = f"{i:09d}"
    extra: dict[str, bytes] = {}
    if split.startswith("zs/"):
        label = i // per_class
        colour, shape = ALL_PAIRS[label]
        scene = world2.single_scene2(rng, px, colour, shape, style=ZS_STYLES.get(split[3:], "solid"))
        caption = a(f"{colour} {shape}") + "."
        extra = {"cls": str(label).encode()}
    elif split.startswith("dense/"):
        scene = world2.dense_scene2(rng, px)
        caption = ""
    else:
        scene = world2.sample_scene2(rng, px)
        caption = world2.caption_scene2(scene, rng)
    img, mask = world2.render_scene2(scene, rng)
    if split.startswith("dense/"):
        # the image-level label the classification reader needs: the object with the most visible pixels (the
        # dense probe reads the masks; its scenes hold 3-5 distinct shapes, so no image label fits every token)
        ids, counts = np.unique(np.asarray(mask), return_counts=True)
        big = max((int(c), -int(k)) for k, c in zip(ids, counts) if k > 0)
        label_obj = scene.objects[-big[1] - 1]
        caption = a(label_obj.describe()) + "."
        extra = {"cls": str(label_obj.label).encode()}
    meta = {"key": key, "caption": caption, "status": "success", "width": px, "height": px, **scene.to_json()}
    out = {"png": _png(img), "txt": caption.encode(), "json": _json(meta), MASK_EXT: encode_mask(mask), **extra}
    if split in ("instruct", "instruct_test"):
        out = {"png": out["png"], "txt": out["txt"], "json": _json(world2.scene_qa2(scene, rng)),
               "objects.json": out["json"]}
    return key, out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    tf.addfile(ti, io.BytesIO(data))


_EXT_ORDER = ("png", "mp4", "txt", "cls", "json", "objects.json", MASK_EXT)


def write_shard(task: tuple) -> tuple[str, int]:
    """Write samples [start, end) of `split` to `path`. Returns (path, count)."""
    path, split, start, end, seed, px, per_class, world = task
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(start, end):
            key, members = make_sample(split, i, seed, px, per_class, world)
            for ext in _EXT_ORDER:
                if ext in members:
                    _add(tf, f"{key}.{ext}", members[ext])
    return path, end - start


def _per_shard(n: int, shard_size: int) -> int:
    # at least ~8 shards when possible, so ranks x workers each get whole shards
    return max(1, min(shard_size, max(16, math.ceil(n / 8))))


def generate_shapes_world(out: str | Path, train: int = 20000, seed: int = 0, size: int = 64,
                          retrieval: Optional[int] = None, zeroshot_per_class: Optional[int] = None,
                          video_train: Optional[int] = None, video_test: Optional[int] = None,
                          instruct: Optional[int] = None, instruct_test: Optional[int] = None,
                          probe_per_class: Optional[int] = None, shard_size: int = 1000, workers: Optional[int] = None,
                          marker: bool = True, world: int = 1, dense_train: Optional[int] = None,
                          dense_test: Optional[int] = None) -> dict:
    """Generate every split into `out` (created; should be empty). Returns the manifest. `world`: the world
    version (1: the default; 2: world2.py, which adds the dense-probe split dense/{train,test})."""
    t0 = time.monotonic()
    out = Path(out)
    world = check_world(world)
    if size < 16 or (world == 2 and size < 32):
        raise ValueError(f"shapes world image size must be >= {16 if world == 1 else 32}, got {size}")
    counts = default_counts(train, world)
    for k, v in (("retrieval", retrieval), ("zeroshot_per_class", zeroshot_per_class), ("video_train", video_train),
                 ("video_test", video_test), ("instruct", instruct), ("instruct_test", instruct_test),
                 ("probe_per_class", probe_per_class), ("dense_train", dense_train), ("dense_test", dense_test)):
        if v is not None and (k in counts or world == 2):
            counts[k] = int(v)
    per_class = counts["zeroshot_per_class"]
    n_zs = per_class * len(CLASSES)
    # split -> (folder of the shards, count, naming)
    plan = {
        "train": (out / "train", counts["train"], "img2dataset"),
        "retrieval": (out / "retrieval" / "test", counts["retrieval"], "clip_benchmark"),
        **{f"zs/{name}": (out / "zeroshot" / name / "test", n_zs, "clip_benchmark") for name in ZS_STYLES},
        "video/train": (out / "video" / "train", counts["video_train"], "img2dataset"),
        "video/test": (out / "video" / "test", counts["video_test"], "img2dataset"),
        "instruct": (out / "instruct", counts["instruct"], "img2dataset"),
        "instruct_test": (out / "instruct_test", counts["instruct_test"], "img2dataset"),
        "zs/train": (out / "zeroshot" / "test" / "train", counts["probe_per_class"] * len(CLASSES), "clip_benchmark"),
    }
    if world == 2:
        plan["dense/train"] = (out / "dense" / "train", counts["dense_train"], "clip_benchmark")
        plan["dense/test"] = (out / "dense" / "test", counts["dense_test"], "clip_benchmark")
    tasks, split_shards = [], {}
    for split, (folder, n, naming) in plan.items():
        folder.mkdir(parents=True, exist_ok=True)
        if n <= 0:
            split_shards[split] = []
            continue
        per = _per_shard(n, shard_size)
        names = []
        for k, start in enumerate(range(0, n, per)):
            name = f"{k:05d}.tar" if naming == "img2dataset" else f"{k}.tar"
            names.append((name, min(per, n - start)))
            split_per_class = counts["probe_per_class"] if split == "zs/train" else per_class
            tasks.append((str(folder / name), split, start, min(n, start + per), seed, size, split_per_class, world))
        split_shards[split] = names
    # video shards are the slowest: start them first
    tasks.sort(key=lambda t: (not t[1].startswith("video"), t[1], t[2]))
    n_proc = workers if workers is not None else (os.cpu_count() or 1)
    n_proc = max(1, min(n_proc, len(tasks), 8))
    if workers is None and sum(t[3] - t[2] for t in tasks) < 2000:
        n_proc = 1  # a small world: a process pool would cost more than it saves
    if n_proc > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(n_proc) as pool:
            list(pool.imap_unordered(write_shard, tasks, chunksize=1))
    else:
        for t in tasks:
            write_shard(t)
    # per-split metadata
    splits: dict[str, Any] = {}
    for split, (folder, n, naming) in plan.items():
        names = split_shards[split]
        if naming == "img2dataset":
            (folder / "sizes.json").write_text(json.dumps({nm: c for nm, c in names}, indent=1, sort_keys=True))
        else:
            (folder / "nshards.txt").write_text(f"{len(names)}\n")
        splits[split] = {"path": str(folder.relative_to(out)), "shards": [nm for nm, _ in names], "samples": n}
    (out / "retrieval" / "dataset_type.txt").write_text("retrieval\n")
    heldout = "\n".join(heldout_classes()) + "\n"
    (out / "zeroshot" / "heldout_classes.txt").write_text(heldout)
    for name in ZS_STYLES:
        d = out / "zeroshot" / name
        (d / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
        (d / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
        (d / "heldout_classes.txt").write_text(heldout)
    if world == 2:  # the dense-probe set: CLIP_benchmark classification layout, labels = the largest object
        (out / "dense" / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
        (out / "dense" / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    manifest = {
        "generator": "pe_lightning.data.shapes",
        "version": VERSION,
        "seed": seed,
        "size": size,
        "counts": counts,
        "splits": splits,
        "zeroshot": {"classes": CLASSES, "templates": list(TEMPLATES), "heldout": heldout_classes(),
                     "styles": {k: v for k, v in ZS_STYLES.items()}, "per_class": per_class},
        "shapes": list(SHAPES),
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "sizes": SIZES,
        "heldout_pairs": [list(p) for p in HELDOUT],
        "formats": {"image": "png (lossless: exact colours, masks align)", "mask": f"{MASK_EXT}: uint8 instance ids "
                    "(0 = background, i = json objects[i-1]); objects[].label = class index in zeroshot.classes",
                    "video": "mp4 (H.264, yuv420p)", "instruct": "json: list of {question, answer}"},
    }
    if world == 2:  # (version 1's manifest stays as it was, byte for byte)
        manifest["world"] = 2
        manifest["sizes"] = {k: list(v) for k, v in SIZES2.items()}
        manifest["formats"]["mask"] += ("; world 2: objects are listed back to front (z), each id marks the pixels "
                                        "where that object is visible")
        manifest["dense"] = {"path": "dense", "classes": "background + the 6 shapes (dense probe); .cls = the "
                             "largest visible object's colour-shape class", "objects_per_scene": list(DENSE_N)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if marker:
        (out / MARKER).write_text(json.dumps(_params(train, seed, size, counts, world), sort_keys=True))
    dt = time.monotonic() - t0
    n_img = (counts["train"] + counts["retrieval"] + 4 * n_zs + counts["instruct"] + counts["instruct_test"]
             + counts["probe_per_class"] * len(CLASSES) + counts.get("dense_train", 0) + counts.get("dense_test", 0))
    log.info("shapes world: %d images + %d clips in %.1fs (%d processes) -> %s", n_img,
             counts["video_train"] + counts["video_test"], dt, n_proc, out)
    manifest["_timing"] = {"seconds": dt, "images": n_img, "clips": counts["video_train"] + counts["video_test"],
                           "processes": n_proc}
    return manifest


def _params(train: int, seed: int, size: int, counts: dict, world: int = 1) -> dict:
    params = {"version": VERSION, "train": int(train), "seed": int(seed), "size": int(size), "counts": counts}
    if world != 1:  # version 1's marker stays as it was
        params["world"] = int(world)
    return params


def is_complete(root: str | Path) -> bool:
    return (Path(root) / MARKER).is_file()


def ensure_shapes_world(root: str | Path, train: int = 20000, seed: int = 0, size: int = 64, world: int = 1,
                        **counts: Any) -> Path:
    """Generate the shapes world into `root` unless a complete one with these parameters is there.

    Safe to call from every rank at once (a file lock serialises them) and atomic (generated into a tmp dir
    that is renamed into place, with the completion marker written last). A complete world generated with
    other parameters is an error, never silently reused or overwritten."""
    root = Path(root).expanduser().resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    world = check_world(world)
    want_counts = default_counts(train, world)
    want_counts.update({k: int(v) for k, v in counts.items() if v is not None and k in want_counts})

    def check() -> bool:
        if not is_complete(root):
            return False
        have = json.loads((root / MARKER).read_text())
        want = _params(train, seed, size, want_counts, world)
        if have != want:
            diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
            raise DataError(f"the shapes world at {root} was generated with other parameters "
                            f"(have vs requested: {diff}); set data.root to another folder, match the parameters "
                            f"(data.shapes_train / shapes_seed / shapes_size / shapes_version), or delete {root} to "
                            "regenerate")
        return True

    if check():
        return root
    import fcntl

    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if check():
            return root
        if root.exists() and any(root.iterdir()) and not (root / "manifest.json").exists():
            raise DataError(f"{root} exists and is not a shapes world (no manifest.json); set data.root to an "
                            "empty or new folder, or remove it")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("generating the shapes world into %s (train=%d, seed=%d, size=%d, world %d)", root, train, seed,
                 size, world)
        try:
            generate_shapes_world(tmp, train=train, seed=seed, size=size, world=world, **{
                k: v for k, v in counts.items() if k in ("retrieval", "zeroshot_per_class", "video_train",
                                                         "video_test", "instruct", "instruct_test",
                                                         "probe_per_class", "shard_size", "workers", "dense_train",
                                                         "dense_test")})
            if root.exists():  # an incomplete earlier attempt
                stale = root.parent / f".{root.name}.stale-{os.getpid()}"
                os.rename(root, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
