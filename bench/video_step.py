"""Section `video`: our video stage's training step against open_clip's image step on the same frames.

Ours: the real `VideoStage` built from the recipe (recipes/video.yaml + the preset's scale), one step = C clips
of N frames (frame embeddings averaged, then CLIP against the clips' captions) + I images (CLIP against
theirs), through the minimal loop (bench/step.py `loop_step`: the stage's hooks and training_step, backward,
the optimizer from `configure_optimizers`). The batch is synthetic and already on the device. C is sized so
that the step's vision rows C*N + I equal the bench batch (CPU 64, GPU 256), with I = C*N/8 images
(our choice for the bench; the recipe's own mix is a recipe key).
Peer: open_clip's image step (forward, `ClipLoss`, AdamW, the logit-scale clamp: bench/openclip_peer.py) on
C*N + I images and as many captions: the same vision rows, so the rows compare what a video step costs over an
image step of the same frames (ours also runs C + I captions where the peer runs C*N + I).
Rows: clips/s, frames/s (vision rows per second: clip frames + images), step ms. Beside them the decoder's
clips/s with 2 workers (bench/video_decode.py) on a shapes world of 256 clips of its own (`<--data-root>-video`,
generated on first use): what the loader can feed the step.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.common import autocast, error_record, free_memory, rss_bytes, steps_table, synthetic_batch, time_loop

IMAGE_SHARE = 8  # images per step = clip frames per step / 8 (our choice for the bench)


def step_sizes(vision_rows: int, num_frames: int, chunk: int) -> tuple[int, int]:
    """(clips, images) per step whose vision rows clips*num_frames + images fill `vision_rows`, each a
    multiple of `chunk` (the data module's unit)."""
    clips = max(chunk, (vision_rows * IMAGE_SHARE // (num_frames * IMAGE_SHARE + num_frames)) // chunk * chunk)
    images = max(chunk, (vision_rows - clips * num_frames) // chunk * chunk)
    return clips, images


def synthetic_video_batch(clips: int, images: int, num_frames: int, resolution: int, context_length: int,
                          device: torch.device, seed: int = 0) -> dict:
    """The stage's nested batch: {"video": {"video" [C,N,3,S,S], "text"}, "image": {"image", "text"}}."""
    frames = synthetic_batch(clips * num_frames, resolution, context_length, device, seed=seed)
    imgs = synthetic_batch(images, resolution, context_length, device, seed=seed + 1)
    return {"video": {"video": frames["image"].view(clips, num_frames, 3, resolution, resolution),
                      "text": frames["text"][:clips]}, "image": imgs}


def _row(name: str, res: dict, clips: int, frames: int) -> dict:
    row = {"name": name, **res, "status": "ok", "step_ms": res["step_s"] * 1000}
    row["clips_per_s"] = clips / res["step_s"] if clips else None
    row["frames_per_s"] = frames / res["step_s"]
    row["images_per_s"] = row["frames_per_s"]  # vision rows per second, for the shared table helpers
    return row


def bench_video(ctx) -> dict:
    from bench.openclip_peer import _features, build_peer, param_groups
    from bench.step import loop_step
    from open_clip.loss import ClipLoss
    from pe_lightning.stages import load_stage_recipe
    from pe_lightning.stages.video import VideoStage

    device = ctx.device
    probe = load_stage_recipe("video", [f"model={ctx.preset}"])
    n, chunk = int(probe.data.num_frames), 8
    clips, images = step_sizes(ctx.batch, n, chunk)
    rows = clips * n + images
    overrides = [f"model={ctx.preset}", f"model.compile={'true' if ctx.compile else 'false'}",
                 f"data.image_size={ctx.resolution}", f"data.chunk_size={chunk}", f"video.clip_batch_size={clips}",
                 f"video.image_batch_size={images}", "train.total_samples=1000000000000",
                 f"trainer.precision={ctx.precision}", *ctx.overrides]
    cfg = load_stage_recipe("video", overrides)
    section: dict[str, Any] = {"status": "ok", "preset": ctx.preset, "resolution": ctx.resolution,
                               "num_frames": n, "clips": clips, "images": images, "vision_rows": rows,
                               "recipe_overrides": overrides, "rows": []}
    ctx.publish(section)
    free_memory(device)
    baseline = rss_bytes()
    torch.manual_seed(cfg.seed)
    stage = VideoStage(cfg)
    batch = synthetic_video_batch(clips, images, n, ctx.resolution, stage.model.context_length, device)
    print(f"[bench] video: ours, {clips} clips x {n} frames + {images} images ...", flush=True)
    try:
        with loop_step(stage, batch, device, ctx.precision) as step:
            res = time_loop(step, device, ctx.warmup, ctx.steps, baseline)
        section["rows"].append(_row(f"ours: video step ({clips} clips x {n} frames + {images} images)", res,
                                    clips, rows))
    except Exception as err:
        section["rows"].append({"name": "ours: video step", **error_record(err)})
    ctx.checkpoint()
    stage.cpu()
    del stage, batch
    free_memory(device)

    name = ctx.peer if ctx.peer != "auto" else ("PE-Core-B-16" if device.type == "cuda" else "tiny")
    print(f"[bench] video: open_clip image step on {rows} images ...", flush=True)
    try:
        model, label = build_peer(name, ctx.resolution)
        model = model.to(device).train()
        peer_batch = synthetic_batch(rows, ctx.resolution, model.context_length, device, seed=0)
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, **fused)
        loss_fn, max_scale = ClipLoss(), math.log(100)

        def peer_step(i: int) -> None:
            with autocast(device, ctx.precision):
                img, txt, scale = _features(model(peer_batch["image"], peer_batch["text"]))
                loss = loss_fn(img, txt, scale)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)

        res = time_loop(peer_step, device, max(3, ctx.warmup // 2), ctx.steps, baseline)
        section["rows"].append(_row(f"open_clip: image step ({label}, {rows} images)", res, 0, rows))
        del model, optimizer, peer_batch
    except Exception as err:
        section["rows"].append({"name": "open_clip: image step", **error_record(err)})
    ctx.checkpoint()
    free_memory(device)

    try:
        section["decode"] = measure_decoder(ctx, n, chunk)
    except Exception as err:  # the decoder row is an extra: its failure keeps the step rows
        section["decode"] = error_record(err)
    ctx.checkpoint()
    return section


def num_frames_of(dec: dict) -> int:
    return int(dec["video_shape"][1])


def ensure_video_world(root: Path, clips: int = 256) -> tuple[Path, float]:
    """A shapes world of its own holding only `clips` training clips (64 px mp4), generated on first use."""
    from pe_lightning.data.shapes.writer import ensure_shapes_world

    t0 = time.perf_counter()
    path = ensure_shapes_world(root, train=16, seed=0, size=64, retrieval=0, zeroshot_per_class=0,
                               video_train=clips, video_test=0, instruct=0, instruct_test=0, probe_per_class=0)
    return path, time.perf_counter() - t0


def measure_decoder(ctx, num_frames: int, batch: int) -> dict:
    """The real VideoTextDataModule's clips/s with 2 workers (bench/video_decode.py) on `<data-root>-video`."""
    from bench.video_decode import measure_decode

    root, gen_s = ensure_video_world(Path(str(ctx.data_root) + "-video"))
    print("[bench] video: decoder, 2 workers ...", flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        row = measure_decode(root, [2], clips=128, image_size=ctx.resolution, num_frames=num_frames,
                             batch_size=batch)[0]
    return {**row, "status": "ok", "generate_s": gen_s, "root": str(root)}


def video_lines(sec: dict) -> list[str]:
    """The report's `video` table."""
    lines = ["## Video step (ours) vs open_clip's image step on the same frames", ""]
    if sec.get("status") != "ok":
        return lines + [f"{sec.get('status')}: {sec.get('error', '')}", ""]
    lines += [f"{sec['clips']} clips x {sec['num_frames']} frames + {sec['images']} images = {sec['vision_rows']} "
              f"vision rows per step at {sec['resolution']} px; minimal loop, synthetic batch on the device.", ""]
    lines += steps_table(sec.get("rows", []), ["clips/s", "frames/s"],
                         lambda r: [f"{r['clips_per_s']:,.1f}" if r.get("clips_per_s") else "-",
                                    f"{r['frames_per_s']:,.0f}"])
    ok = [r for r in sec.get("rows", []) if r.get("status") == "ok"]
    if len(ok) == 2:
        lines += ["", f"ours / open_clip, frames/s: **{ok[0]['frames_per_s'] / ok[1]['frames_per_s']:.2f}x**."]
    dec = sec.get("decode") or {}
    if dec.get("status") == "ok":
        lines += ["", f"Decoder (VideoTextDataModule over {dec['root']}, {dec['workers']} workers, "
                      f"{dec['frame_sampling']} frames, {num_frames_of(dec)} of {sec['resolution']} px per clip): "
                      f"{dec['clips_per_s']:,.1f} clips/s ({dec['frames_per_s']:,.0f} frames/s); the step above "
                      "needs the clips/s of its own row."]
    elif dec:
        lines += ["", f"Decoder: failed: {dec.get('error')}"]
    return lines + [""]
