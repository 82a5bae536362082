"""2D rotary position embedding exactly as Meta's PE (PE_REFERENCE.md section 2).

* head_dim/4 frequencies per axis: freq_k = theta ** (-k / (head_dim/4)), k = 0 .. head_dim/4 - 1.
* Positions are the integer grid indices at every resolution (Meta's code; timm rescales to its reference grid,
  which only agrees at the native resolution). With a class token the grid starts at 1 and the class token gets
  angle 0 (identity); without one (G) the grid starts at 0.
* Angle layout per token: [x * freq (each repeated twice), y * freq (each repeated twice)], i.e. the first
  half of the head vector follows the column (x), the second half the row (y); tokens are row-major (h, w).
* Rotation of adjacent pairs: (a, b) -> (a cos - b sin, b cos + a sin), in fp32, for q and k.

cos/sin are built once per forward (not per block) from `torch.arange` on the input's device: a few
thousand multiply-adds, cheaper than a cache lookup, always fp32 (a cached float buffer would be cast by
`model.half()`), and free of Python-side state, so `torch.compile` traces it as constants of the shape.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def rope_frequencies(head_dim: int, theta: float = 10000.0, device: Optional[torch.device] = None) -> torch.Tensor:
    """[head_dim // 4] fp32 frequencies per axis (computed as Meta and timm do: 1 / theta ** (k / n))."""
    n = head_dim // 4
    exponent = torch.arange(n, device=device, dtype=torch.int64).to(torch.float32) / n
    return 1.0 / (theta ** exponent)


def rope_angles(grid_h: int, grid_w: int, head_dim: int, cls_token: bool, theta: float = 10000.0,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Angles [(1 if cls_token) + grid_h * grid_w, head_dim] in fp32, one per head-vector element."""
    freqs = rope_frequencies(head_dim, theta, device)
    offset = 1 if cls_token else 0
    ys = torch.arange(grid_h, device=device, dtype=torch.float32) + offset
    xs = torch.arange(grid_w, device=device, dtype=torch.float32) + offset
    y = ys.repeat_interleave(grid_w)  # row-major tokens: row index
    x = xs.repeat(grid_h)  # column index
    ax = (x[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)
    ay = (y[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)
    angles = torch.cat([ax, ay], dim=-1)
    if cls_token:
        angles = torch.cat([angles.new_zeros(1, head_dim), angles], dim=0)
    return angles


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [..., N, head_dim] in fp32 (or fp64 for fp64 x); returns x's dtype.

    Two spellings of the same arithmetic: under torch.compile the real-valued one, which Inductor fuses into a
    single kernel; in eager mode one complex multiply, which makes no temporaries (4x faster on CPU)."""
    xf = x if x.dtype == torch.float64 else x.float()
    if torch.compiler.is_compiling():
        rotated = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
        return (xf * cos + rotated * sin).to(x.dtype)
    pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (a, b) -> a + ib
    turn = torch.complex(cos[..., 0::2], sin[..., 0::2])  # cos/sin repeat each angle over its pair
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)  # (a cos - b sin) + i(b cos + a sin)


class Rope2D(nn.Module):
    """Holds the RoPE settings of a tower; `forward(grid_h, grid_w, device)` -> (cos, sin) [N, head_dim] fp32.

    No parameters and no buffers: nothing of it appears in a state dict (as in Meta's files).
    """

    def __init__(self, head_dim: int, cls_token: bool, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.cls_token = cls_token
        self.theta = theta

    def forward(self, grid_h: int, grid_w: int, device: Optional[torch.device] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        angles = rope_angles(grid_h, grid_w, self.head_dim, self.cls_token, self.theta, device)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, cls_token={self.cls_token}, theta={self.theta}"
