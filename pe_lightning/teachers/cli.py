"""`pe-lightning teacher oracle|sam --data SHARDS --out DIR [...]`: build a teacher cache (teachers/cache.py).

  pe-lightning teacher oracle --data data/shapes/train --out cache/oracle [--grid 32] [--tokens 8] [--dim 128]
  pe-lightning teacher sam --data SHARDS --out DIR --checkpoint sam2.1_hiera_large.pt [--config large]
                           [--size 1024] [--chunk 256] [--grid 32] [--tokens 32] [--dim 128]

Finished shards are skipped, so rerunning the same command resumes an interrupted build. Several processes
split the shards: `--rank R --world W`, or launch with torchrun (RANK / WORLD_SIZE; each rank uses
cuda:LOCAL_RANK). User errors (bad path, missing weights, a folder holding another cache) are raised as
pe_lightning UserErrors, which the top-level command prints as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

__all__ = ["build_parser", "main"]

TEACHER_NAMES = {"oracle": "oracle", "sam": "sam2", "sam2": "sam2"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pe-lightning teacher", description="Build a mask-logit teacher cache: "
                                "companion shards of the data shards, keyed like them.")
    p.add_argument("teacher", choices=sorted(TEACHER_NAMES), help="oracle (exact shapes-world masks) or sam (SAM 2.1)")
    p.add_argument("--data", required=True, help="source shards: a folder, glob or brace list (e.g. data/shapes/train)")
    p.add_argument("--out", required=True, help="the cache folder")
    p.add_argument("--grid", type=int, default=32, help="n: an n x n grid of point prompts (default 32 = 1024 prompts)")
    p.add_argument("--tokens", type=int, default=8, help="the student's token grid side, resolution / patch "
                   "(default 8: the tiny preset at 64 px)")
    p.add_argument("--dim", type=int, default=128, help="random-projection dim of the n*n channels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="the projection's seed")
    p.add_argument("--size", type=int, default=None, help="teacher input size: images are squashed to it "
                   "(sam: SAM's input resolution, default 1024; oracle: default the image's own size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world", type=int, default=None)
    g = p.add_argument_group("oracle")
    g.add_argument("--magnitude", type=float, default=10.0, help="logit magnitude m: +m inside, -m outside")
    g.add_argument("--kind", choices=("binary", "graded"), default="binary", help="binary: +-m over the region "
                   "under the point; graded: clipped signed distance to its boundary, background answered locally "
                   "(teachers/oracle.py)")
    g.add_argument("--clip", type=float, default=0.1, help="graded: saturation distance, fraction of the side")
    g.add_argument("--radius", type=float, default=0.25, help="graded: a background point's disc, fraction of "
                   "the side")
    g = p.add_argument_group("sam")
    g.add_argument("--checkpoint", default=None, help="SAM 2.1 weights (e.g. sam2.1_hiera_large.pt)")
    g.add_argument("--config", default="large", help="tiny | small | base_plus | large, or a sam2 package config")
    g.add_argument("--chunk", type=int, default=256, help="prompts per mask-decoder call")
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    g.add_argument("--dtype", default="bfloat16", help="autocast dtype on CUDA (default bfloat16)")
    g.add_argument("--random-weights", action="store_true", help="random SAM weights (tests and benchmarks only)")
    return p


def _device(arg: Optional[str]) -> Optional[str]:
    if arg:
        return arg
    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def teacher_from_args(args: argparse.Namespace):
    """(teacher, its recorded arguments, teacher input size)."""
    from pe_lightning.teachers import build_teacher

    name = TEACHER_NAMES[args.teacher]
    if name == "oracle":
        kw = {"grid": args.grid, "magnitude": args.magnitude}
        if args.kind != "binary":  # the binary oracle records what it always did: its caches stay valid
            kw.update(kind=args.kind, clip=args.clip, radius=args.radius)
        return build_teacher("oracle", **kw), kw, args.size
    size = args.size or 1024
    kw = {"config": args.config, "image_size": size, "grid": args.grid,
          "random_weights": bool(args.random_weights),
          "checkpoint": os.path.basename(args.checkpoint) if args.checkpoint else None}
    teacher = build_teacher("sam2", ckpt_path=args.checkpoint, config=args.config, image_size=size, grid=args.grid,
                            chunk=args.chunk, device=_device(args.device), dtype=args.dtype,
                            random_weights=args.random_weights)
    return teacher, kw, size


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("pe_lightning").setLevel(logging.INFO)
    from pe_lightning.teachers.cache import build_cache

    teacher, recorded, size = teacher_from_args(args)
    summary = build_cache(teacher, args.data, args.out, tokens=args.tokens, dim=args.dim, seed=args.seed,
                          size=size, batch_size=args.batch_size, rank=args.rank, world=args.world,
                          teacher_args=recorded)
    index = summary.pop("index")
    rate = summary["images_per_s"]
    print(f"teacher cache {args.out}: rank {summary['rank']}/{summary['world']} built {len(summary['built'])} "
          f"shards ({summary['images']} images{f', {rate:.1f} img/s' if rate else ''}), "
          f"skipped {summary['skipped']} finished ones")
    if index is not None:
        e = index["similarity_error"]
        state = "complete" if index["complete"] else f"{len(index['missing'])} shards still missing"
        print(f"  {index['samples']} samples, {state}; compressed similarity error: mean {e['mean_abs']:.4f}, "
              f"rms {e['rms']:.4f}, p99 {e['p99_worst_shard']:.4f}, max {e['max']:.4f} "
              f"(dim {index['stored_dim']} of {index['grid'] ** 2} channels)")
        r = index.get("target_effective_rank") or {}
        if r.get("images"):
            print(f"  target Gram effective rank: mean {r['mean']:.2f}, min {r['min']:.2f}, max {r['max']:.2f} "
                  f"(of {index['tokens'] ** 2} tokens)")
        print(json.dumps({"index": os.path.join(args.out, "index.json")}))
    return 0
