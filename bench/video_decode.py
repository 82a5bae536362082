"""The video stage's input pipeline alone: clips/s (and frames/s) out of the real `VideoTextDataModule`
(PyAV decode of the sampled frames, one augmentation per clip, tokenized captions) with N loader workers.

It reads the `video/train` split of a shapes world (mp4 clips of 8-16 frames at the world's image size,
64 px by default) and emits `image_size` frames, `num_frames` per clip, in batches of `batch_size` clips.
The first batch (worker start-up) is timed apart; the rate is measured over the next `clips` clips. The
shapes world's clips are tiny and short: web clips of 10 s at 30 fps and 360p cost many times more per clip
(most of it decoding frames that are not kept), so treat the figure as an upper bound.

    .venv/bin/python bench/video_decode.py --data-root data/shapes --workers 0,1,2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

__all__ = ["measure_decode", "format_table"]


def _measure_one(root: Path, workers: int, clips: int, image_size: int, num_frames: int, batch_size: int,
                 frame_sampling: str) -> dict:
    from pe_lightning.data import DataConfig, VideoTextDataModule
    from pe_lightning.models.tokenizer import get_tokenizer

    cfg = DataConfig(root=str(root), generate=False, image_size=image_size, num_frames=num_frames,
                     workers=workers, chunk_size=batch_size, frame_sampling=frame_sampling)
    dm = VideoTextDataModule(cfg, tokenize=get_tokenizer(32), seed=0, batch_size=batch_size)
    loader = dm.train_dataloader()
    if hasattr(loader, "samples_per_epoch"):
        loader.samples_per_epoch = 1 << 40  # one endless pass: no worker restart at an epoch boundary
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n = 0
    while n < clips:
        n += next(it)["video"].shape[0]
    elapsed = time.perf_counter() - t1
    del it
    return {"workers": workers, "effective_workers": getattr(loader, "effective_workers", lambda: workers)(),
            "first_batch_s": t1 - t0, "clips": n, "seconds": elapsed, "clips_per_s": n / elapsed,
            "frames_per_s": n * num_frames / elapsed, "video_shape": list(first["video"].shape),
            "frame_sampling": frame_sampling, "skipped": dm.skipped()}


def measure_decode(data_root: str | Path, workers_list: Sequence[int] = (0, 1, 2), clips: int = 256,
                   image_size: int = 64, num_frames: int = 8, batch_size: int = 16,
                   frame_sampling: str = "uniform") -> list[dict]:
    """One row per worker count: {"workers", "clips_per_s", "frames_per_s", "first_batch_s", "clips",
    "seconds", "video_shape", "skipped", ...}. `data_root` is a complete shapes world (not generated here)."""
    root = Path(data_root).resolve()
    return [_measure_one(root, int(w), clips, image_size, num_frames, batch_size, frame_sampling)
            for w in workers_list]


def format_table(rows: list[dict]) -> str:
    lines = ["| workers | clips/s | frames/s | first batch s | clips | clip batch shape | skipped |",
             "|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['clips_per_s']:.1f} | {r['frames_per_s']:.0f} | "
                     f"{r['first_batch_s']:.2f} | {r['clips']} | {r['video_shape']} | {r['skipped'] or '-'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="data/shapes", help="a complete shapes world (make data)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts")
    p.add_argument("--clips", type=int, default=256, help="clips timed per row, after the first batch")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--frame-sampling", default="uniform", choices=["uniform", "segment"])
    a = p.parse_args(argv)
    rows = measure_decode(a.data_root, [int(w) for w in a.workers.split(",")], a.clips, a.image_size,
                          a.num_frames, a.batch_size, a.frame_sampling)
    print(f"video decode: {a.data_root}/video/train, {a.num_frames} frames of {a.image_size} px, "
          f"batches of {a.batch_size} clips, {a.frame_sampling} frames")
    print(format_table(rows))


if __name__ == "__main__":
    main()
