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
    flops = tower_training_flops(preset, resolution, vision, text)
    return flops["vision"] + flops["text"]


def tower_training_flops(preset: str, resolution: int, vision: dict | None = None,
                         text: dict | None = None) -> dict[str, float]:
    """{"vision": ..., "text": ...}: forward + backward FLOPs of each tower for one sample (see
    `training_flops_per_sample`). The vision figure also prices extra vision passes, such as the pretrain
    stage's masked sub-batch (`mask_reg.batch_fraction` of the batch: vision FLOPs x that fraction)."""
    vision_flops, text_flops = _flops(preset, resolution, _key(vision), _key(text))
    return {"vision": vision_flops, "text": text_flops}


def _key(d: dict | None) -> tuple:
    return tuple(sorted((k, _freeze(v)) for k, v in (d or {}).items()))


def _freeze(v):
    if isinstance(v, dict):
        return _key(v)
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(t: tuple) -> dict:
    return {k: (_thaw(v) if isinstance(v, tuple) and v and isinstance(v[0], tuple) else v) for k, v in t}


@lru_cache(maxsize=32)
def _flops(preset: str, resolution: int, vision: tuple, text: tuple) -> tuple[float, float]:
    from pe_lightning.models import build_model

    with torch.device("meta"):
        model = build_model(preset, vision=_thaw(vision), text=_thaw(text))
        images = torch.zeros(1, 3, resolution, resolution)
        tokens = torch.zeros(1, model.context_length, dtype=torch.long)
    counts = []
    for run in (lambda: model.encode_image(images), lambda: model.encode_text(tokens)):
        counter = FlopCounterMode(display=False)
        with counter:
            run().sum().backward()
        counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1]


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
