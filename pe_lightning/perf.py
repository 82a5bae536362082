"""Performance accounting shared by the throughput callback and `make bench`: FLOPs and device peak."""

from __future__ import annotations

import time
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode


def training_flops_per_sample(preset: str, resolution: int, vision: dict | None = None,
                              text: dict | None = None) -> float:
    """FLOPs of one forward + backward of image and text towers for one sample, counted by
    torch.utils.flop_counter on a model built on the meta device (no memory, no compute)."""
    return _flops(preset, resolution, tuple(sorted((vision or {}).items())), tuple(sorted((text or {}).items())))


@lru_cache(maxsize=32)
def _flops(preset: str, resolution: int, vision: tuple, text: tuple) -> float:
    from pe_lightning.models import build_model

    with torch.device("meta"):
        model = build_model(preset, vision=dict(vision), text=dict(text))
        images = torch.zeros(1, 3, resolution, resolution)
        tokens = torch.zeros(1, model.context_length, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model.encode_image(images).sum() + model.encode_text(tokens).sum()
        loss.backward()
    return float(counter.get_total_flops())


def matmul_peak_flops(device: torch.device | str, dtype: torch.dtype | None = None, size: int | None = None,
                      repeats: int = 10) -> float:
    """Measured dense matmul FLOP/s on `device` (bf16 8192^3 on GPU, fp32 1024^3 on CPU by default)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    size = size or (8192 if on_gpu else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
