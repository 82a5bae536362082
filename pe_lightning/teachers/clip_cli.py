"""`pe-lightning teacher clip --data SHARDS --out DIR --weights TEACHER.pt --model PRESET [...]`: precompute a
frozen CLIP teacher's image and text embeddings per shard (pe_lightning/teachers/clip_cache.py), resumably.

The cache must be built with the training run's seed and `data.augment` (pass them with --seed and
--augment KEY=VALUE ...); the distill stage's decoder refuses a cache built with other settings. Rerunning
the same command completes a partial cache: only missing, truncated or stale shard files are rebuilt.
User errors (missing shards or weights, a cache folder built with other settings) raise the project's
one-line errors (DataError, CheckpointError, FileNotFoundError), which `pe-lightning` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Optional

from pe_lightning.data.config import AugmentConfig

__all__ = ["build_parser", "parse_augment", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pe-lightning teacher clip",
                                description="Cache a frozen CLIP teacher's embeddings per shard, with N stored "
                                            "augmentations per sample (replayed by the distill stage).")
    p.add_argument("--data", required=True, help="shards: a path, folder, glob or brace list (`::` joins several)")
    p.add_argument("--out", required=True, help="cache folder (one per set of uniquely named shards)")
    p.add_argument("--weights", required=True, help="the teacher's weights (a PE-Core file, ours or Meta's)")
    p.add_argument("--model", required=True, help="the teacher's model preset (e.g. PE-Core-G14-448, tiny)")
    p.add_argument("--seed", type=int, default=0, help="the training run's seed (default 0, as recipes/base.yaml)")
    p.add_argument("--num-augmentations", type=int, default=10,
                   help="stored augmentations per sample (default 10; MobileCLIP used 10 to 30)")
    p.add_argument("--image-size", type=int, default=None,
                   help="the teacher's input resolution (default: the preset's native one)")
    p.add_argument("--augment", nargs="*", default=[], metavar="KEY=VALUE",
                   help="the run's data.augment keys that differ from the defaults, e.g. crop_scale_min=0.5")
    p.add_argument("--batch-size", type=int, default=256, help="images per teacher forward (default 256)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--bf16", action="store_true", help="run the teacher under bf16 autocast (cuda only)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="storage dtype of the embeddings (default float32)")
    return p


def parse_augment(items: list[str]) -> AugmentConfig:
    from pe_lightning.config import RecipeError

    names = {f.name: f for f in dataclasses.fields(AugmentConfig)}
    kw = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise RecipeError(f"--augment {item!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        if key == "enabled":
            if value.lower() not in ("true", "false", "1", "0"):
                raise RecipeError(f"--augment enabled={value!r}: expected true or false")
            kw[key] = value.lower() in ("true", "1")
        else:
            try:
                kw[key] = float(value)
            except ValueError:
                raise RecipeError(f"--augment {key}={value!r}: expected a number") from None
    return AugmentConfig(**kw)


def main(argv: Optional[list[str]] = None) -> int:
    """Build or complete the cache; returns 0. Prints what was built and kept."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from pe_lightning.data.shards import expand_shards
    from pe_lightning.models import build_model
    from pe_lightning.teachers.clip_cache import build_clip_cache, teacher_fingerprint

    augment = parse_augment(args.augment)
    shards = expand_shards(args.data, what="--data")
    fingerprint = teacher_fingerprint(args.weights)
    teacher = build_model(args.model, checkpoint=args.weights)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    summary = build_clip_cache(shards, args.out, teacher, teacher_id=fingerprint, model=args.model, seed=args.seed,
                               num_augmentations=args.num_augmentations, augment=augment,
                               image_size=args.image_size, dtype=args.dtype, batch_size=args.batch_size,
                               device=device, bf16=args.bf16)
    rate = summary["images"] / max(summary["seconds"], 1e-9)
    print(f"teacher cache -> {args.out}: built {len(summary['built'])} shard(s) ({summary['samples']} samples, "
          f"{summary['images']} images, {rate:.0f} images/s), kept {len(summary['kept'])} already complete")
    return 0


if __name__ == "__main__":
    from pe_lightning.errors import USER_ERRORS

    try:
        raise SystemExit(main())
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}")
