"""`pe-lightning data shapes --out DIR [--train N] [--seed S] [--size PX] [--version 1|2] ...`: generate the shapes
world."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

from pe_lightning.data.shapes.writer import (MARKER, WORLDS, _params, default_counts, generate_shapes_world,
                                             is_complete)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pe-lightning data shapes",
                                description="Generate the shapes world (seeded, deterministic) as webdataset shards.")
    p.add_argument("--out", required=True, help="output folder (the recipes' data.root, default data/shapes)")
    p.add_argument("--train", type=int, default=20000, help="training scenes (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--version", type=int, default=1, choices=WORLDS,
                   help="world version: 1 (default) or 2 (1-5 overlapping objects, textures, partial captions, "
                        "counting/relation QA, a dense-probe split; render it at --size 128)")
    p.add_argument("--dense-train", type=int, default=None, help="version 2: dense-probe train scenes (default 320)")
    p.add_argument("--dense-test", type=int, default=None, help="version 2: dense-probe test scenes (default 160)")
    p.add_argument("--retrieval", type=int, default=None, help="retrieval pairs (default 1000)")
    p.add_argument("--zeroshot-per-class", type=int, default=None, help="images per class and style (default 10)")
    p.add_argument("--video-train", type=int, default=None, help="training clips (default train/10)")
    p.add_argument("--video-test", type=int, default=None, help="test clips (default train/100, at least 32)")
    p.add_argument("--instruct", type=int, default=None, help="QA scenes (default train/4)")
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="overwrite an existing world in --out")
    return p


def same_request(out: Path, args: argparse.Namespace) -> bool:
    have = json.loads((out / MARKER).read_text())
    counts = default_counts(args.train, args.version)
    for k in ("retrieval", "zeroshot_per_class", "video_train", "video_test", "instruct", "dense_train", "dense_test"):
        if getattr(args, k) is not None and k in counts:
            counts[k] = getattr(args, k)
    return have == _params(args.train, args.seed, args.size, counts, args.version)


def main(argv: Optional[list[str]] = None) -> int:
    """Returns the exit status (0 = the world is there, 1 = refused to overwrite)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.force:
            if is_complete(out) and same_request(out, args):
                print(f"{out} already holds a complete shapes world with these parameters; nothing to do")
                return 0
            state = "a shapes world with other parameters" if is_complete(out) else "other files"
            print(f"{out} already holds {state}; pass --force to overwrite, or choose another --out",
                  file=sys.stderr)
            return 1
        shutil.rmtree(out)
    m = generate_shapes_world(out, train=args.train, seed=args.seed, size=args.size, retrieval=args.retrieval,
                              zeroshot_per_class=args.zeroshot_per_class, video_train=args.video_train,
                              video_test=args.video_test, instruct=args.instruct, shard_size=args.shard_size,
                              workers=args.workers, world=args.version, dense_train=args.dense_train,
                              dense_test=args.dense_test)
    t = m["_timing"]
    print(f"shapes world -> {out} ({MARKER} written)")
    for split, info in m["splits"].items():
        print(f"  {split:12s} {info['samples']:7d} samples in {len(info['shards'])} shards under {info['path']}")
    print(f"  held out: {', '.join(m['zeroshot']['heldout'])}")
    print(f"  {t['images']} images + {t['clips']} clips in {t['seconds']:.1f}s with {t['processes']} processes "
          f"({(t['images'] + t['clips']) / max(t['seconds'], 1e-9):.0f} samples/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
