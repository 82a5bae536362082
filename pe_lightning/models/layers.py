"""Transformer building blocks in Meta's parameter names (PE_REFERENCE.md sections 1 and 5).

Block: `ln_1`, `attn.{in_proj_weight, in_proj_bias, out_proj}`, `ls_1.gamma`, `ln_2`, `mlp.{c_fc, c_proj}`,
`ls_2.gamma`; pre-norm, x = x + drop_path(ls_1(attn(ln_1(x)))); x = x + drop_path(ls_2(mlp(ln_2(x)))).
LayerScale and DropPath are `nn.Identity` when off, so they add no keys to the state dict.
Attention goes through `F.scaled_dot_product_attention` (scale head_dim^-0.5, its default).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath

from .rope import apply_rope

RopeCS = Optional[Tuple[torch.Tensor, torch.Tensor]]


class LayerScale(nn.Module):
    """Per-channel gain `gamma` [dim]."""

    def __init__(self, dim: int, init_value: float = 0.1):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _FusedQKV(nn.Module):
    """nn.MultiheadAttention's parameter layout: `in_proj_weight` [3W, W], `in_proj_bias` [3W], `out_proj`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self, attn_std: Optional[float] = None, proj_std: Optional[float] = None) -> None:
        attn_std = self.dim ** -0.5 if attn_std is None else attn_std
        proj_std = self.dim ** -0.5 if proj_std is None else proj_std
        nn.init.normal_(self.in_proj_weight, std=attn_std)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.normal_(self.out_proj.weight, std=proj_std)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, N, W] -> [B, H, N, D]
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:  # [B, H, N, D] -> [B, N, W]
        return t.transpose(1, 2).flatten(2)


class SelfAttention(_FusedQKV):
    """Multi-head self-attention; optional 2D RoPE on q and k (fp32), optional causal mask."""

    def forward(self, x: torch.Tensor, rope: RopeCS = None, is_causal: bool = False) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return self.out_proj(self._merge(out))


class CrossAttention(_FusedQKV):
    """Attention of a query sequence over a key/value sequence with the fused layout (attention pooling)."""

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w_q, w_kv = self.in_proj_weight.split([self.dim, 2 * self.dim])
        b_q, b_kv = self.in_proj_bias.split([self.dim, 2 * self.dim])
        q = self._heads(F.linear(query, w_q, b_q))
        k, v = F.linear(x, w_kv, b_kv).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, self._heads(k), self._heads(v))
        return self.out_proj(self._merge(out))


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(dim, hidden)),
        ("gelu", nn.GELU()),  # exact (erf) GELU
        ("c_proj", nn.Linear(hidden, dim)),
    ]))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, ls_init_value: Optional[float] = None,
                 drop_path: float = 0.0, ln_eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = SelfAttention(dim, heads)
        self.ls_1 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = _mlp(dim, mlp_dim)
        self.ls_2 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: RopeCS = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.ls_1(self.attn(self.ln_1(x), rope=rope, is_causal=is_causal)))
        x = x + self.drop_path(self.ls_2(self.mlp(self.ln_2(x))))
        return x

    def init_weights(self, width: int, layers: int) -> None:
        """CLIP's init (as open_clip): attn std W^-0.5, out/c_proj std W^-0.5 (2L)^-0.5, c_fc (2W)^-0.5."""
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        self.attn.reset_parameters(attn_std=width ** -0.5, proj_std=proj_std)
        nn.init.normal_(self.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(self.mlp.c_proj.weight, std=proj_std)
        nn.init.zeros_(self.mlp.c_fc.bias)
        nn.init.zeros_(self.mlp.c_proj.bias)

    def set_layer_scale(self, init_value: float) -> None:
        """Add LayerScale (gamma = init_value) where absent; existing gammas are kept as they are."""
        p = self.ln_1.weight
        dim = p.shape[0]
        for name in ("ls_1", "ls_2"):
            if not isinstance(getattr(self, name), LayerScale):
                ls = LayerScale(dim, init_value).to(device=p.device, dtype=p.dtype).train(self.training)
                setattr(self, name, ls)

    @torch.no_grad()
    def rescale_layer_scale(self, value: float) -> None:
        """Set both gammas to `value` and keep the block's function: each branch's output projection (attention
        `out_proj`, MLP `c_proj`, weight rows and bias) takes the factor old_gamma / value, so
        gamma' * (W' x + b') = gamma * (W x + b) per output channel. Needs LayerScale in the block."""
        for ls, proj in ((self.ls_1, self.attn.out_proj), (self.ls_2, self.mlp.c_proj)):
            if not isinstance(ls, LayerScale):
                raise ValueError("rescale_layer_scale needs LayerScale in the block (set_layer_scale first)")
            factor = ls.gamma / float(value)
            proj.weight.mul_(factor[:, None])
            proj.bias.mul_(factor)
            ls.gamma.fill_(float(value))

    def set_drop_path(self, rate: float) -> None:
        self.drop_path = (DropPath(rate) if rate > 0 else nn.Identity()).train(self.training)


class Transformer(nn.Module):
    """`resblocks` ModuleList; `grad_checkpointing` re-computes each block in backward while training."""

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, ls_init_value: Optional[float] = None,
                 drop_path: float = 0.0, ln_eps: float = 1e-5, grad_checkpointing: bool = False):
        super().__init__()
        self.width = width
        self.grad_checkpointing = grad_checkpointing
        self.resblocks = nn.ModuleList([
            ResidualAttentionBlock(width, heads, mlp_dim, ls_init_value, drop_path, ln_eps) for _ in range(layers)
        ])

    @property
    def layers(self) -> int:
        return len(self.resblocks)

    def run_block(self, block: nn.Module, x: torch.Tensor, rope: RopeCS = None, is_causal: bool = False):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, rope, is_causal, use_reentrant=False)
        return block(x, rope=rope, is_causal=is_causal)

    def forward(self, x: torch.Tensor, rope: RopeCS = None, is_causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = self.run_block(block, x, rope, is_causal)
        return x

    def init_weights(self) -> None:
        for block in self.resblocks:
            block.init_weights(self.width, len(self.resblocks))


class AttentionPooling(nn.Module):
    """Meta's attention pooling: one learned query `probe` [1, 1, W], `attn` (8 heads) over all tokens, no
    residual around the attention, then out + mlp(layernorm(out)). Returns [B, W]."""

    def __init__(self, dim: int, heads: int = 8, mlp_ratio: float = 4.0, ln_eps: float = 1e-5):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, dim))
        self.attn = CrossAttention(dim, heads)
        self.layernorm = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = _mlp(dim, int(dim * mlp_ratio))
        self.init_weights()

    def init_weights(self) -> None:
        dim = self.probe.shape[-1]
        nn.init.normal_(self.probe, std=dim ** -0.5)
        self.attn.reset_parameters()
        nn.init.normal_(self.mlp.c_fc.weight, std=(2 * dim) ** -0.5)
        nn.init.normal_(self.mlp.c_proj.weight, std=dim ** -0.5)
        nn.init.zeros_(self.mlp.c_fc.bias)
        nn.init.zeros_(self.mlp.c_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.probe.expand(x.shape[0], -1, -1).to(x.dtype)
        out = self.attn(query, x)
        out = out + self.mlp(self.layernorm(out))
        return out[:, 0]


__all__ = ["LayerScale", "SelfAttention", "CrossAttention", "ResidualAttentionBlock", "Transformer",
           "AttentionPooling"]
