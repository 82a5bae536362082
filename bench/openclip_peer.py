"""Section `openclip`: the same training step in open_clip, in the same process, on the same batch.

open_clip's own training step (open_clip_train/train.py): forward under bf16 autocast, `ClipLoss`,
backward, AdamW (fused on CUDA; open_clip's two groups: no weight decay on gains, biases and the
temperature), zero_grad, then the logit-scale clamp. No gradient clipping (open_clip's default,
--grad-clip-norm unset); no mask regularization (open_clip has none). Eager, then `torch.compile(model)` as
open_clip's --torchcompile does.

On GPU the model is `open_clip.create_model('PE-Core-B-16')` (timm's `vit_pe_core_base_patch16_224` + the
CLIP text tower: the PE-Core-B16-224 architecture). On CPU it is an open_clip CLIP ViT with the `tiny`
preset's widths, depths, heads, MLP sizes and patch size, read from our preset (`tiny_sized_config`): open_clip
has no model with our tiny preset's conv stem, RoPE and attention pooling, so its FLOPs are counted
separately and the CPU ratio compares two similar, not identical, models.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import autocast, error_record, free_memory, rss_bytes, synthetic_batch, time_loop

GPU_MODEL = "PE-Core-B-16"


def tiny_sized_config(resolution: int) -> dict:
    """open_clip CLIP kwargs with our `tiny` preset's sizes (so the two cannot drift apart)."""
    from pe_lightning.models.presets import get_preset

    v, t = get_preset("tiny").vision, get_preset("tiny").text
    return dict(embed_dim=v.output_dim,
                vision_cfg=dict(image_size=resolution, patch_size=v.patch_size, width=v.width, layers=v.layers,
                                head_width=v.width // v.heads, mlp_ratio=v.mlp_dim / v.width),
                text_cfg=dict(context_length=t.context_length, vocab_size=49408, width=t.width, heads=t.heads,
                              layers=t.layers, mlp_ratio=t.mlp_dim / t.width))


def build_peer(name: str, resolution: int):
    import open_clip

    if name == "tiny":
        return open_clip.model.CLIP(**tiny_sized_config(resolution)), f"open_clip CLIP ViT (tiny-sized) @ {resolution}px"
    kwargs = {} if resolution == 224 else {"force_image_size": resolution}
    return open_clip.create_model(name, pretrained=None, **kwargs), f"open_clip {name} @ {resolution}px"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip_train/main.py: gains, biases, embeddings-like 1-D params and logit_scale get no decay."""
    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def count_flops(model, batch: dict, precision: str, device: torch.device) -> float:
    """Forward + backward FLOPs per sample, counted on 2 samples of the real batch."""
    from open_clip.loss import ClipLoss

    images, texts = batch["image"][:2], batch["text"][:2]
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(device, precision):
            out = model(images, texts)
            img, txt, scale = _features(out)
            loss = ClipLoss()(img, txt, scale)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def _features(out: Any):
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def bench_openclip(ctx) -> dict:
    from open_clip.loss import ClipLoss

    device = ctx.device
    name = GPU_MODEL if ctx.peer == "auto" and device.type == "cuda" else ("tiny" if ctx.peer == "auto" else ctx.peer)
    free_memory(device)
    baseline = rss_bytes()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, label = build_peer(name, ctx.resolution)
    model = model.to(device).train()
    section: dict[str, Any] = {"status": "ok", "model": label, "batch": ctx.batch, "resolution": ctx.resolution,
                               "precision": ctx.precision, "build_s": time.perf_counter() - t0,
                               "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                               "optimizer": "torch AdamW" + (" (fused)" if device.type == "cuda" else " (foreach)"),
                               "rows": []}
    ctx.publish(section)
    batch = synthetic_batch(ctx.batch, ctx.resolution, model.context_length, device, seed=0)
    try:
        section["flops_per_sample"] = count_flops(model, batch, ctx.precision, device)
    except Exception as err:  # FLOPs only feed the MFU column
        section["flops_error"] = f"{type(err).__name__}: {err}"
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, **fused)
    loss_fn = ClipLoss()
    images, texts = batch["image"], batch["text"]
    max_scale = math.log(100)

    def make_step(fwd):
        def step(i: int) -> None:
            with autocast(device, ctx.precision):
                img, txt, scale = _features(fwd(images, texts))
                loss = loss_fn(img, txt, scale)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)
        return step

    variants = ["eager"] + (["compiled"] if ctx.peer_compile else [])
    for variant in variants:
        row: dict[str, Any] = {"name": f"open_clip: {variant}", "driver": variant}
        print(f"[bench] openclip: {variant} ...", flush=True)
        try:
            fwd = model if variant == "eager" else torch.compile(model)
            warmup = ctx.warmup if variant == "compiled" else max(3, ctx.warmup // 2)
            res = time_loop(make_step(fwd), device, warmup, ctx.steps, baseline)
            row.update(res)
            row["warmup_steps"] = warmup
            row["images_per_s"] = ctx.batch / res["step_s"]
            row["step_ms"] = res["step_s"] * 1000
            if ctx.peak_flops and section.get("flops_per_sample"):
                row["mfu"] = section["flops_per_sample"] * row["images_per_s"] / ctx.peak_flops
            row["status"] = "ok"
        except Exception as err:
            row.update(error_record(err))
            print(f"[bench] openclip: {variant} FAILED: {row['error']}", flush=True)
        section["rows"].append(row)
        ctx.checkpoint()
    if not ctx.peer_compile:
        section["note"] = "compiled variant not run (CPU default; --compile on to run it)"
    del model, optimizer, batch
    free_memory(device)
    return section
