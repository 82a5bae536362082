"""Section `profile`: where our step's device time goes, by kind of kernel, from torch.profiler over a few
steps of the minimal loop (after the `step` section has compiled it). This is the map for making the step
faster: matmuls near their peak leave only the other rows to win back.

Kinds: matmul (cuBLAS / CUTLASS GEMMs, and Inductor's own), attention (flash / cuDNN / efficient SDPA),
fused (Inductor's Triton kernels: norms, activations, RoPE, residuals), optimizer (on GPU by name: the LAMB / Adam
kernels, which alone use lerp, and the multi-tensor foreach kernels; on CPU every op under the optimizer step), copy (memcpy / memset / dtype casts),
other. On CPU the same table is built from CPU ops' self time (coarser: ops, not kernels).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from bench.common import error_record, synchronize
from bench.step import StageUnderTest, loop_step

KINDS = ("matmul", "attention", "fused", "optimizer", "copy", "other")


def kernel_kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("lerp", "multi_tensor", "foreach", "adam", "lamb")):
        return "optimizer"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "sm90_xmma", "cublas", "nvjet", "aten::mm", "aten::addmm", "aten::bmm")):
        return "matmul"
    if any(k in n for k in ("memcpy", "memset", "copy_", "aten::to", "cast")):
        return "copy"
    if n.startswith("triton") or "fused" in n:
        return "fused"
    return "other"


def bench_profile(ctx, steps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    sut = getattr(ctx, "stage_under_test", None) or StageUnderTest(ctx)
    ctx.stage_under_test = sut
    device = sut.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with loop_step(sut.stage, sut.batch, device, ctx.precision) as step:
            for i in range(3):  # compiles the optimizer, warms the allocator
                step(i)
            synchronize(device)
            with profile(activities=activities) as prof:
                for i in range(3, 3 + steps):
                    step(i)
                synchronize(device)
        section = summarize(prof, device, steps)
    except Exception as err:
        section = error_record(err)
    finally:
        sut.park()
    return section


def _inside(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def summarize(prof, device: torch.device, steps: int) -> dict:
    """Device time per step by kind, and the top kernels."""
    on_gpu = device.type == "cuda"
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if on_gpu:
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            t = e.device_time
            kind = kernel_kind(e.name)
        else:
            t = e.self_cpu_time_total  # self time: each microsecond is counted in exactly one op
            kind = "optimizer" if _inside(e, "pe_optimizer_step") else kernel_kind(e.name)
        by_kind[kind] += t
        by_name[e.name][0] += t
        by_name[e.name][1] += 1
    total = sum(by_kind.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "status": "ok", "steps": steps, "timeline": "CUDA kernels" if on_gpu else "CPU ops",
        "ms_per_step": {k: by_kind.get(k, 0.0) / 1000 / steps for k in KINDS},
        "share": {k: by_kind.get(k, 0.0) / total for k in KINDS},
        "top": [{"name": name[:120], "ms_per_step": t / 1000 / steps, "calls_per_step": n / steps}
                for name, (t, n) in top],
    }
