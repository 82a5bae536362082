"""Performance accounting shared by the stages (FLOPs per sample), the throughput callback and `make bench`."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def training_flops(run: Callable[[], torch.Tensor]) -> float:
    """FLOPs of `run()` forward + backward (`.sum().backward()`), counted by torch.utils.flop_counter. Build
    the model and inputs on the meta device: no memory, no compute."""
    counter = FlopCounterMode(display=False)
    with counter:
        run().sum().backward()
    return float(counter.get_total_flops())


def tower_training_flops(preset: str, resolution: int, vision: dict | None = None,
                         text: dict | None = None) -> dict[str, float]:
    """{"vision": ..., "text": ...}: forward + backward FLOPs of each CLIP tower for one sample. The vision
    figure also prices extra vision passes, such as the pretrain stage's masked sub-batch (vision FLOPs x
    its batch fraction)."""
    from pe_lightning.models import build_model

    with torch.device("meta"):
        model = build_model(preset, vision=vision or {}, text=text or {})
        images = torch.zeros(1, 3, resolution, resolution)
        tokens = torch.zeros(1, model.context_length, dtype=torch.long)
    return {"vision": training_flops(lambda: model.encode_image(images)),
            "text": training_flops(lambda: model.encode_text(tokens))}


def matmul_peak_flops(device: torch.device | str, dtype: torch.dtype | None = None, size: int | None = None,
                      repeats: int = 10, trials: int = 3) -> float:
    """Measured dense matmul FLOP/s on `device` (bf16 8192^3 on GPU, fp32 1024^3 on CPU by default): the best
    of `trials` timed windows of `repeats` products each, on random data (zeros run faster than real data)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    size = size or (8192 if on_gpu else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(max(1, trials)):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
