"""Section `data`: the training data pipeline alone: decoded + augmented + tokenized images/s out of
`ImageTextDataModule` (pe_lightning.data) reading shapes-world shards, with N loader workers.

A shapes world of its own (train split only, PNG 64 px) is generated under `--data-root` on first use. The
loader emits `data.image_size` = the step section's resolution, with the recipe's augmentations
(recipes/data/shapes.yaml), tokenized captions, in batches of the step section's batch size. The first batch
(worker start-up) is timed apart; the rate is measured over the following `--data-seconds`.
Shapes-world PNGs are small (64 px); web JPEGs of ~500 px cost several times more to decode per image.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import error_record


def ensure_world(root: Path, train: int) -> tuple[Path, float]:
    from pe_lightning.data.shapes.writer import ensure_shapes_world

    t0 = time.perf_counter()
    path = ensure_shapes_world(root, train=train, seed=0, size=64, retrieval=0, zeroshot_per_class=0,
                               video_train=0, video_test=0, instruct=0)
    return path, time.perf_counter() - t0


def measure(ctx, root: Path, workers: int, train: int) -> dict:
    from pe_lightning.stages import load_stage_recipe
    from pe_lightning.data import ImageTextDataModule
    from pe_lightning.models.presets import get_preset
    from pe_lightning.models.tokenizer import get_tokenizer

    cfg = load_stage_recipe("pretrain", [f"model={ctx.preset}", f"data.root={root}", f"data.shapes_train={train}",
                                   "data.shapes_seed=0", "data.shapes_size=64", "data.generate=false",
                                   f"data.workers={workers}", f"data.image_size={ctx.resolution}"]
                      + [o for o in ctx.overrides if o.startswith("data.")])
    preset = get_preset(cfg.model.preset, vision=dict(cfg.model.vision), text=dict(cfg.model.text))
    context = preset.text.context_length if preset.text is not None else 32
    dm = ImageTextDataModule(cfg.data, tokenize=get_tokenizer(context), seed=0, batch_size=ctx.batch)
    loader = dm.train_dataloader()
    if hasattr(loader, "samples_per_epoch"):
        loader.samples_per_epoch = 1 << 40  # one endless pass: no worker restart at an epoch boundary
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    n = batches = 0
    while True:
        batch = next(it)
        n += batch["image"].shape[0]
        batches += 1
        elapsed = time.perf_counter() - t1
        if elapsed >= ctx.data_seconds and batches >= 2:
            break
    del it
    return {"workers": workers, "effective_workers": getattr(loader, "effective_workers", lambda: workers)(),
            "first_batch_s": t1 - t0, "samples": n, "seconds": elapsed, "images_per_s": n / elapsed,
            "image_shape": list(first["image"].shape), "text_shape": list(first["text"].shape),
            "skipped": dm.skipped(), "status": "ok"}


def bench_data(ctx) -> dict:
    root = Path(ctx.data_root).resolve()
    section: dict[str, Any] = {"status": "ok", "root": str(root), "shapes_train": ctx.data_train,
                               "batch": ctx.batch, "resolution": ctx.resolution, "seconds_per_point": ctx.data_seconds,
                               "rows": []}
    ctx.publish(section)
    path, gen_s = ensure_world(root, ctx.data_train)
    section["generate_s"] = gen_s
    for workers in ctx.data_workers:
        print(f"[bench] data: {workers} workers ...", flush=True)
        try:
            row = measure(ctx, path, workers, ctx.data_train)
        except Exception as err:
            row = {"workers": workers, **error_record(err)}
            print(f"[bench] data: {workers} workers FAILED: {row['error']}", flush=True)
        section["rows"].append(row)
        ctx.checkpoint()
    return section
