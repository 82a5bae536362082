"""Section `spatial`: the spatial stage's step from the teacher cache against the pretrain step of the same model,
and the oracle teacher cache's build rate.

Ours: the real `SpatialStage` (recipes/spatial.yaml + the preset's scale) on a synthetic batch already on the
device, as the dense data module yields it (images, a cached target [B, g*g, 128], the patch mask), through the
minimal loop (bench/step.py `loop_step`): student forward + backward on the masked input, the frozen teacher's
forward through k blocks, the two losses, LAMB. Its parent is a fresh model of the preset (random weights
change nothing in the timing). Beside it, the same loop over `PretrainStage` of the same preset at the same
batch and resolution (CLIP loss, text tower, mask regularisation on 1/16 of the batch): the ratio is what
the spatial step costs over a pretrain step of the same model. Last row: `build_cache` with the `oracle`
teacher (32 x 32 prompts, the tiny preset's 8 x 8 grid) over the first shard of a 1,000-scene shapes world of its
own (`<--data-root>-spatial`), in images/s; SAM 2.1 has its own rate (0.2 s per image on an H200) and needs
the user's weights, so it is not run here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import error_record, free_memory, rss_bytes, steps_table, synthetic_batch, time_loop


def synthetic_dense_batch(batch: int, resolution: int, grid: int, dim: int, ratio: float,
                          device: torch.device, seed: int = 0) -> dict:
    from pe_lightning.data.dense import patch_mask_for

    g = torch.Generator().manual_seed(seed)
    return {"image": synthetic_batch(batch, resolution, 8, device, seed=seed)["image"],
            "key": [f"{i:09d}" for i in range(batch)], "flip": torch.zeros(batch, dtype=torch.bool, device=device),
            "target": torch.randn(batch, grid * grid, dim, generator=g).to(device),
            "patch_mask": torch.stack([patch_mask_for(seed, i, grid * grid, ratio) for i in range(batch)]).to(device)}


def _row(name: str, res: dict, batch: int) -> dict:
    return {"name": name, **res, "status": "ok", "step_ms": res["step_s"] * 1000,
            "images_per_s": batch / res["step_s"]}


def _fresh_parent(preset: str, folder: Path, overrides: list[str]) -> Path:
    from pe_lightning.exports import write_model_json
    from pe_lightning.models import build_model
    from pe_lightning.models.checkpoint import export_checkpoint
    from pe_lightning.stages import load_stage_recipe

    m = load_stage_recipe("pretrain", [f"model={preset}", *overrides]).model
    model = build_model(m.preset, vision=dict(m.vision), text=dict(m.text))
    export_checkpoint(model, folder / "model.pt")
    write_model_json(model, folder)
    return folder


def bench_spatial(ctx) -> dict:
    from bench.step import loop_step
    from pe_lightning.exports import Export
    from pe_lightning.stages import load_stage_recipe
    from pe_lightning.stages.pretrain import PretrainStage
    from pe_lightning.stages.spatial import SpatialStage

    device, batch, res = ctx.device, ctx.batch, ctx.resolution
    common = [f"model={ctx.preset}", f"model.compile={'true' if ctx.compile else 'false'}",
              f"data.image_size={res}", f"train.batch_size={batch}", "train.phases=[]",
              "train.total_samples=1000000000000", f"trainer.precision={ctx.precision}", *ctx.overrides]
    section: dict[str, Any] = {"status": "ok", "preset": ctx.preset, "resolution": res, "batch": batch,
                               "recipe_overrides": common, "rows": []}
    ctx.publish(section)
    baseline = rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        parent = Export.at(_fresh_parent(ctx.preset, Path(tmp), ctx.overrides))
        cfg = load_stage_recipe("spatial", common)
        torch.manual_seed(cfg.seed)
        stage = SpatialStage(cfg, parents={"init": parent, "teacher": parent})
        grid = res // stage.patch_size
        section.update(grid=grid, teacher_layer=stage.teacher_layer, mask_ratio=float(stage.args.mask_ratio))
        dense = synthetic_dense_batch(batch, res, grid, int(stage.args.cache_dim), stage.args.mask_ratio, device)
        print(f"[bench] spatial: ours, {batch} images, {grid}x{grid} tokens ...", flush=True)
        try:
            with loop_step(stage, dense, device, ctx.precision) as step:
                section["rows"].append(_row(f"ours: spatial step from the cache ({batch} images)",
                                            time_loop(step, device, ctx.warmup, ctx.steps, baseline), batch))
        except Exception as err:
            section["rows"].append({"name": "ours: spatial step", **error_record(err)})
        ctx.checkpoint()
        stage.cpu()
        del stage, dense
        free_memory(device)

    print(f"[bench] spatial: pretrain step of {ctx.preset}, {batch} images ...", flush=True)
    try:
        cfg = load_stage_recipe("pretrain", common)
        torch.manual_seed(cfg.seed)
        stage = PretrainStage(cfg)
        images = synthetic_batch(batch, res, stage.model.context_length, device)
        with loop_step(stage, images, device, ctx.precision) as step:
            section["rows"].append(_row(f"ours: pretrain step, same model ({batch} images)",
                                        time_loop(step, device, ctx.warmup, ctx.steps, baseline), batch))
        stage.cpu()
        del stage, images
    except Exception as err:
        section["rows"].append({"name": "ours: pretrain step", **error_record(err)})
    ctx.checkpoint()
    free_memory(device)

    try:
        section["cache"] = measure_oracle_cache(Path(str(ctx.data_root) + "-spatial"))
    except Exception as err:  # an extra: its failure keeps the step rows
        section["cache"] = error_record(err)
    ctx.checkpoint()
    return section


def measure_oracle_cache(root: Path, tokens: int = 8) -> dict:
    """`build_cache(oracle)` over the first shard of a 1,000-scene world, into a temporary folder: images/s and the
    measured similarity error of the compressed cache."""
    from pe_lightning.data.shapes.writer import ensure_shapes_world
    from pe_lightning.teachers import build_teacher
    from pe_lightning.teachers.cache import build_cache

    world = ensure_shapes_world(root, train=1000, seed=0, size=64, retrieval=0, zeroshot_per_class=0,
                                video_train=0, video_test=0, instruct=0, instruct_test=0, probe_per_class=0)
    shard = sorted((Path(world) / "train").glob("*.tar"))[0]
    print("[bench] spatial: oracle teacher cache ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = build_cache(build_teacher("oracle", grid=32), [str(shard)], tmp, tokens=tokens, rank=0, world=1)
        seconds = time.perf_counter() - t0
    return {"status": "ok", "images": summary["images"], "seconds": seconds,
            "images_per_s": summary["images"] / seconds, "similarity_error": summary["index"]["similarity_error"],
            "tokens": tokens, "grid": 32, "shard": str(shard)}


def spatial_lines(sec: dict) -> list[str]:
    """The report's `spatial` table."""
    lines = ["## Spatial step from the teacher cache vs the pretrain step of the same model", ""]
    if sec.get("status") != "ok":
        return lines + [f"{sec.get('status')}: {sec.get('error', '')}", ""]
    lines += [f"{sec['batch']} images at {sec['resolution']} px ({sec.get('grid')}x{sec.get('grid')} tokens, teacher "
              f"layer {sec.get('teacher_layer')}, {sec.get('mask_ratio')} of the patches masked); minimal loop, "
              "synthetic batch on the device.", ""]
    lines += steps_table(sec.get("rows", []), ["images/s"], lambda r: [f"{r['images_per_s']:,.1f}"])
    ok = [r for r in sec.get("rows", []) if r.get("status") == "ok"]
    if len(ok) == 2:
        lines += ["", f"spatial / pretrain, images/s: **{ok[0]['images_per_s'] / ok[1]['images_per_s']:.2f}x**."]
    cache = sec.get("cache") or {}
    if cache.get("status") == "ok":
        e = cache["similarity_error"]
        lines += ["", f"Oracle teacher cache ({cache['grid']}x{cache['grid']} prompts, {cache['tokens']}x"
                      f"{cache['tokens']} tokens, one process): {cache['images_per_s']:,.0f} images/s over "
                      f"{cache['images']} images; compressed similarity error mean {e['mean_abs']:.4f}, "
                      f"max {e['max']:.4f}."]
    elif cache:
        lines += ["", f"Oracle teacher cache: failed: {cache.get('error')}"]
    return lines + [""]
