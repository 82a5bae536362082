"""Section `distill`: our distill stage's training step, teacher online and cached, against open_clip's
distillation step (its `DistillClipLoss`) with the same student, teacher and batch.

Student and teacher: CPU `tiny-half` from `tiny` (the embedded default's pair); GPU the bench preset
(PE-Core-B16-224) from PE-Core-L14-336 run at the bench resolution. The teacher has random weights (the
step's cost does not depend on them), written once as an export folder so the stage reads it as a user's
teacher (`distill.teacher=`). Rows (images/s of the student step, minimal loop of bench/step.py, synthetic
batch on the device, no scratch baseline):
  ours: teacher online   the stage's step: teacher forward under no_grad at its resolution, student forward +
                         backward, distillation + contrastive loss, the optimizer (recipes/distill.yaml's)
  ours: teacher cached   the same step with the teacher's embeddings in the batch (what the cache's loader
                         hands it: `distill.cache=DIR`), so no teacher forward
  open_clip: DistillClipLoss  open_clip's step as its train loop runs it with --distill: teacher forward under
                         no_grad, student forward, ClipLoss's contrastive + distill terms (each model its own
                         scale), AdamW, the logit-scale clamp; open_clip models of the same sizes
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import autocast, error_record, free_memory, rss_bytes, steps_table, synthetic_batch, time_loop


def pair(device: torch.device, preset: str) -> tuple[str, str]:
    """(student preset, teacher preset) of the bench."""
    return ("tiny-half", "tiny") if device.type != "cuda" else (preset, "PE-Core-L14-336")


def open_clip_config(preset: str, resolution: int) -> dict:
    """open_clip CLIP kwargs with our preset's sizes."""
    from pe_lightning.models.presets import get_preset

    p = get_preset(preset)
    v, t = p.vision, p.text
    return dict(embed_dim=v.output_dim,
                vision_cfg=dict(image_size=resolution, patch_size=v.patch_size, width=v.width, layers=v.layers,
                                head_width=v.width // v.heads, mlp_ratio=v.mlp_dim / v.width),
                text_cfg=dict(context_length=t.context_length, vocab_size=49408, width=t.width, heads=t.heads,
                              layers=t.layers, mlp_ratio=t.mlp_dim / t.width))


def write_teacher(preset: str, folder: Path) -> Path:
    """A random-weight teacher of `preset` as an export folder (model.pt + model.json)."""
    from pe_lightning.exports import write_model_json
    from pe_lightning.models import build_model, export_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(preset)
    export_checkpoint(model, folder / "model.pt")
    write_model_json(model, folder)
    return folder


def _row(name: str, res: dict, batch: int) -> dict:
    return {"name": name, **res, "status": "ok", "step_ms": res["step_s"] * 1000,
            "images_per_s": batch / res["step_s"]}


def bench_distill(ctx) -> dict:
    from bench.step import loop_step
    from pe_lightning.stages import load_stage_recipe
    from pe_lightning.stages.distill import DistillStage
    from pe_lightning.exports import Export

    device, batch_size, res = ctx.device, ctx.batch, ctx.resolution
    student, teacher_preset = pair(device, ctx.preset)
    section: dict[str, Any] = {"status": "ok", "student": student, "teacher": teacher_preset, "batch": batch_size,
                               "resolution": res, "rows": []}
    ctx.publish(section)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = write_teacher(teacher_preset, Path(tmp) / "teacher")
        overrides = [f"model={student}", f"model.compile={'true' if ctx.compile else 'false'}",
                     f"data.image_size={res}", f"train.batch_size={batch_size}", "train.phases=[]",
                     "train.total_samples=1000000000000", f"trainer.precision={ctx.precision}",
                     f"distill.teacher={teacher_dir}", f"distill.teacher_resolution={res}",
                     "distill.scratch_baseline=false", *ctx.overrides]
        section["recipe_overrides"] = overrides
        cfg = load_stage_recipe("distill", overrides)
        free_memory(device)
        baseline = rss_bytes()
        torch.manual_seed(cfg.seed)
        stage = DistillStage(cfg, parents={"teacher": Export.at(teacher_dir)})
        batch = synthetic_batch(batch_size, res, stage.model.context_length, device)
        for cached in (False, True):
            name = f"ours: teacher {'cached' if cached else 'online'} ({student} from {teacher_preset})"
            print(f"[bench] distill: {name} ...", flush=True)
            try:
                step_batch = dict(batch)
                if cached:  # the teacher's embeddings as the cache's loader hands them; no teacher forward
                    with torch.no_grad(), autocast(device, ctx.precision):
                        step_batch["teacher_image"], step_batch["teacher_text"] = stage.to(device).teacher_features(batch)
                    stage.teacher_features = lambda b: (b["teacher_image"], b["teacher_text"])
                with loop_step(stage, step_batch, device, ctx.precision) as step:
                    section["rows"].append(_row(name, time_loop(step, device, ctx.warmup, ctx.steps, baseline),
                                                batch_size))
            except Exception as err:
                section["rows"].append({"name": name, **error_record(err)})
            ctx.checkpoint()
        stage.cpu()
        del stage
        free_memory(device)
    section["rows"].append(_open_clip_row(ctx, student, teacher_preset, batch, baseline))
    ctx.checkpoint()
    return section


def _open_clip_row(ctx, student: str, teacher: str, batch: dict, baseline: int) -> dict:
    import open_clip
    from open_clip.loss import DistillClipLoss

    from bench.openclip_peer import _features, param_groups

    device, res = ctx.device, ctx.resolution
    name = f"open_clip: DistillClipLoss ({student}-sized from {teacher}-sized)"
    print(f"[bench] distill: {name} ...", flush=True)
    try:
        model = open_clip.model.CLIP(**open_clip_config(student, res)).to(device).train()
        dist = open_clip.model.CLIP(**open_clip_config(teacher, res)).to(device).eval().requires_grad_(False)
        peer_batch = {k: v[:, : model.context_length] if k == "text" else v for k, v in batch.items()}
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, **fused)
        loss_fn, max_scale = DistillClipLoss(), math.log(100)

        def step(i: int) -> None:
            with autocast(device, ctx.precision):
                img, txt, scale = _features(model(peer_batch["image"], peer_batch["text"]))
                with torch.no_grad():
                    t_img, t_txt, t_scale = _features(dist(peer_batch["image"], peer_batch["text"]))
                contrastive, distill = loss_fn(img, txt, scale, t_img, t_txt, t_scale)
                loss = contrastive + distill
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)

        row = _row(name, time_loop(step, device, max(3, ctx.warmup // 2), ctx.steps, baseline), len(batch["image"]))
        del model, dist, optimizer
        free_memory(device)
        return row
    except Exception as err:
        return {"name": name, **error_record(err)}


def distill_lines(sec: dict) -> list[str]:
    """The report's `distill` table."""
    lines = ["## Distill step: teacher online / cached (ours) vs open_clip's DistillClipLoss", ""]
    if sec.get("status") != "ok":
        return lines + [f"{sec.get('status')}: {sec.get('error', '')}", ""]
    lines += [f"Student {sec['student']} from teacher {sec['teacher']}, batch {sec['batch']} at {sec['resolution']} "
              "px; minimal loop, synthetic batch on the device, random-weight teacher.", ""]
    lines += steps_table(sec.get("rows", []), ["images/s"], lambda r: [f"{r['images_per_s']:,.0f}"])
    ok = {r["name"].split(" (")[0]: r for r in sec.get("rows", []) if r.get("status") == "ok"}
    peer = ok.get("open_clip: DistillClipLoss")
    if peer:
        for key in ("ours: teacher online", "ours: teacher cached"):
            if key in ok:
                lines.append(f"\n{key} / open_clip: **{ok[key]['images_per_s'] / peer['images_per_s']:.2f}x**.")
    return lines + [""]
