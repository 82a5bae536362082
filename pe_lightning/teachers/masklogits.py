"""The mask-logit teacher interface of the spatial stage, its point grid, its logit resize and its registry.

A mask-logit teacher answers, for each of n x n single-point prompts on a regular grid, one mask-logit map
over the image: `teacher(images) -> [B, n*n, h, w]`. Stacked per pixel, the n*n logits are the pixel's
locality feature (two pixels are similar when the same prompts select them); the spatial stage regresses
the student's token similarity matrix onto that of these features (stages/dense_losses.gram_mse_loss).

Conventions
-----------
- Images: `[B, 3, H, W]` in the eval normalisation (data/transforms.py: mean = std = 0.5, values in [-1, 1]).
- Points: `point_grid(n, H, W)` -> `[n*n, 2]` float (x, y) in **continuous pixel coordinates** (pixel
  (i, j) covers [j, j+1) x [i, i+1)), the centres of an n x n grid of equal cells:
  x_k = (k + 0.5) * W / n, ordered row-major (y outer, x inner) like SAM's `build_point_grid`.
  Channel c of the teacher output is the prompt at `point_grid(...)[c]`.
- Logits: positive inside the prompt's mask, negative outside; unbounded (SAM's are clamped to [-32, 32]).
- `resize_logits`: bilinear on the **logits** (not on sigmoid probabilities), antialiased when shrinking,
  `align_corners=False` (our choice; DINOv3 resizes its Gram teacher bicubically). Because the grid and the
  resize are mirror-symmetric, resizing commutes with a horizontal flip.

Register a teacher class with `@register_teacher("name")`; build one with `build_teacher("name", **kw)`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pe_lightning.errors import UserError

__all__ = [
    "TeacherError",
    "MaskLogitTeacher",
    "point_grid",
    "resize_logits",
    "register_teacher",
    "build_teacher",
    "teacher_names",
]


class TeacherError(UserError, RuntimeError):
    """A teacher that cannot be built or run as asked (unknown name, missing weights, missing inputs)."""


def point_grid(n: int, height: int, width: Optional[int] = None) -> torch.Tensor:
    """`[n*n, 2]` (x, y) cell centres of an n x n grid over an H x W image, continuous pixel coordinates."""
    if int(n) <= 0:
        raise ValueError(f"point grid side must be positive, got {n}")
    width = height if width is None else width
    ys = (torch.arange(n, dtype=torch.float32) + 0.5) * (float(height) / n)
    xs = (torch.arange(n, dtype=torch.float32) + 0.5) * (float(width) / n)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def resize_logits(logits: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """`[B, C, h, w]` logits -> `[B, C, *size]`: bilinear on logits, antialiased when shrinking (our choice)."""
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    shrink = size[0] < logits.shape[-2] or size[1] < logits.shape[-1]
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out.to(logits.dtype)


class MaskLogitTeacher(nn.Module):
    """Base class: `grid` = n (n*n point prompts). Subclasses implement `logits(images, points, **extras)`.

    Calling the teacher: `teacher(images, out_size=None, **extras) -> [B, n*n, h, w]` float32 logits, at
    the teacher's native logit resolution (`out_size=None`) or resized with `resize_logits` to `out_size`
    (resizing inside the teacher lets it shrink chunk by chunk: SAM's full output is 256 MiB per image).
    A teacher is frozen: no parameters train, it runs under `torch.no_grad()` in eval mode.
    """

    name = "base"
    extras: tuple[str, ...] = ()  # per-sample inputs it needs besides the image (the cache reads them)

    def __init__(self, grid: int = 32):
        super().__init__()
        if int(grid) <= 0:
            raise ValueError(f"teacher grid must be positive, got {grid}")
        self.grid = int(grid)

    point_grid = staticmethod(point_grid)

    def points_for(self, height: int, width: int) -> torch.Tensor:
        return point_grid(self.grid, height, width)

    def logits(self, images: torch.Tensor, points: torch.Tensor, out_size: Optional[tuple[int, int]],
               **extras) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor, out_size: Optional[tuple[int, int] | int] = None,
                **extras) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher input must be [B, 3, H, W] images, got {tuple(images.shape)}")
        if isinstance(out_size, int):
            out_size = (out_size, out_size)
        points = self.points_for(images.shape[-2], images.shape[-1])
        return self.logits(images, points, out_size, **extras)

    def train(self, mode: bool = True) -> "MaskLogitTeacher":
        return super().train(False)  # frozen: always eval


_REGISTRY: dict[str, type] = {}


def register_teacher(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"teacher {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def teacher_names() -> list[str]:
    return sorted(_REGISTRY)


def build_teacher(name: str, **kwargs) -> MaskLogitTeacher:
    """A registered teacher by name (`sam2`, `oracle`, or one you registered) with its keyword arguments."""
    if name not in _REGISTRY:
        raise TeacherError(f"unknown mask-logit teacher {name!r}; choose one of {teacher_names()} "
                           "(or register your own with pe_lightning.teachers.register_teacher)")
    return _REGISTRY[name](**kwargs)
