"""Section `variants`: our step with one thing changed, through the minimal loop (compare with the step
section's `ours: minimal loop` row). Each row is evidence for (or against) a change to code the bench does
not own:

  no-mask-reg  pretrain.mask_reg.enabled=false: what mask regularization costs (open_clip has none);
  eager        model.compile off: what torch.compile buys;
  timm-lamb    optim.compile=false: timm's Lamb in place of our compiled FusedLamb, in the real step;
  adamw        optim.name=adamw (torch's AdamW, fused on CUDA, + the Trainer's clipping): LAMB's cost over
               open_clip's optimizer, in the real step.

Then the optimizer part alone (`optimizer`): timm's LAMB and our compiled FusedLamb (each clipping inside
its step), torch's fused AdamW and the Trainer's clip_grad_norm_ over the same parameters, in ms per step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import OmegaConf

from bench.common import Window, error_record, free_memory
from bench.step import StageUnderTest, lamb_path, run_loop

VARIANTS = ("no-mask-reg", "eager", "timm-lamb", "adamw")
LABELS = {"no-mask-reg": "ours (loop): no mask regularization",
          "eager": "ours (loop): eager (no torch.compile)",
          "timm-lamb": "ours (loop): timm's Lamb instead of FusedLamb",
          "adamw": "ours (loop): torch AdamW + clipping instead of LAMB"}
# variants that are one recipe key: (section, key, value); the loop builds its optimizer from the recipe
RECIPE_VARIANTS = {"no-mask-reg": ("pretrain.mask_reg", "enabled", False), "timm-lamb": ("optim", "compile", False),
                   "adamw": ("optim", "name", "adamw")}


@contextmanager
def variant(sut: StageUnderTest, name: str):
    stage = sut.stage
    if name in RECIPE_VARIANTS:
        section, key, value = RECIPE_VARIANTS[name]
        node = OmegaConf.select(stage.cfg, section)
        old = node[key]
        node[key] = value
        try:
            yield 0.0 if name == "no-mask-reg" else None
        finally:
            node[key] = old
    elif name == "eager":
        visual, text = stage.model.visual, stage.model.transformer
        saved = (visual._compiled_features, visual._compiled_head, text._compiled_call_impl)
        visual._compiled_features = visual._compiled_head = None
        text._compiled_call_impl = None
        try:
            yield None
        finally:
            visual._compiled_features, visual._compiled_head, text._compiled_call_impl = saved
    else:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")


def optimizer_costs(sut: StageUnderTest, ctx, iters: int = 10) -> dict:
    """The optimizer part of the step alone, on our stage's parameters with random gradients, ms per step
    (CUDA events): timm's LAMB and our compiled FusedLamb (both clipping by the global norm inside the step),
    torch's fused AdamW (open_clip's) and the clip_grad_norm_ the Trainer adds to it, for scale. The weights
    move: run it last."""
    from timm.optim import Lamb

    from pe_lightning.stages.lamb import FusedLamb
    from pe_lightning.stages.optim import param_groups

    device = sut.device
    stage = sut.stage.to(device)
    params = [p for p in stage.parameters() if p.requires_grad]
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device=device, dtype=p.dtype, generator=gen).mul_(1e-3)
    o = stage.cfg.optim

    def groups():
        return param_groups(stage.model, o.weight_decay)

    def timed(fn, key: str) -> None:
        window = Window(device)
        window.start()
        fn()  # the first call compiles where there is something to compile
        out[f"{key}_first_s"] = window.stop()
        for _ in range(2):
            fn()
        window.start()
        for _ in range(iters):
            fn()
        out[f"{key}_ms"] = window.stop() / iters * 1000

    hyper = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, max_grad_norm=o.grad_clip)
    out: dict[str, Any] = {"params_m": sum(p.numel() for p in params) / 1e6, "tensors": len(params)}
    try:
        timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), "clip_grad_norm")
        for key, make in (("timm_lamb", lambda: Lamb(groups(), **hyper)),
                          ("fused_lamb", lambda: FusedLamb(groups(), compile=True, **hyper)),
                          ("adamw", lambda: torch.optim.AdamW(
                              groups(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {"foreach": True})))):
            optimizer = make()
            timed(optimizer.step, key)
            del optimizer
            free_memory(device)
        out["adamw"] = "torch.optim.AdamW " + ("fused" if device.type == "cuda" else "foreach")
        out["timm_lamb"] = f"timm.optim.Lamb, {lamb_path(stage, device)}"
    finally:
        for p in params:
            p.grad = None
        free_memory(device)
    out["status"] = "ok"
    return out


def bench_variants(ctx) -> dict:
    sut = getattr(ctx, "stage_under_test", None) or StageUnderTest(ctx)
    ctx.stage_under_test = sut
    section: dict[str, Any] = {"status": "ok", "rows": [],
                               "compare_with": "step section, row `ours: minimal loop`"}
    ctx.publish(section)
    for name in ctx.variants:
        if name == "eager" and not sut.cfg.model.compile:
            continue
        try:
            with variant(sut, name) as mask_extra:
                row = sut.measure(ctx, LABELS[name], name,
                                  lambda w: run_loop(sut.stage, sut.batch, sut.device, ctx.precision, w, ctx.steps,
                                                     sut.baseline),
                                  mask_extra=mask_extra)
        except ValueError as err:
            row = {"name": name, "driver": name, "status": "failed", "error": str(err)}
        section["rows"].append(row)
        ctx.checkpoint()
    if ctx.optimizer_costs:
        print("[bench] optimizer step alone ...", flush=True)
        try:
            section["optimizer"] = optimizer_costs(sut, ctx)
        except Exception as err:
            section["optimizer"] = error_record(err)
        ctx.checkpoint()
    sut.park()
    return section
