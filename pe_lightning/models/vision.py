"""The PE vision tower in Meta's module names (PE_REFERENCE.md sections 1, 2 and 5).

Forward: `conv1` (or our `stem` for the tiny preset) -> row-major tokens -> [mask_token where masked]
-> [class_embedding] -> + positional_embedding (bilinearly resized off the native grid) -> `ln_pre`
-> blocks with 2D RoPE -> `ln_post` -> `attn_pool` -> `proj`.

Token layout: `[cls] + grid_h * grid_w` patch tokens, row-major; `num_prefix_tokens` is 1 with a class
token, 0 without (G). Patch tokens of `forward_features` output: `tokens[:, visual.num_prefix_tokens:]`,
grid `visual.grid_size(H, W)`.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.models._features import feature_take_indices

from .layers import AttentionPooling, Transformer
from .presets import VisionConfig
from .rope import Rope2D


def resample_posemb(posemb: torch.Tensor, num_prefix_tokens: int, new_hw: Tuple[int, int]) -> torch.Tensor:
    """Resize an absolute posemb [prefix + g*g, W] to [prefix + h*w, W] as Meta does: bilinear,
    align_corners=False, no antialias; the class row is kept aside, not resized."""
    prefix, grid = posemb[:num_prefix_tokens], posemb[num_prefix_tokens:]
    n, width = grid.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"positional embedding with {n} grid rows is not a square grid")
    if (g, g) == tuple(new_hw):
        return posemb
    grid = grid.reshape(1, g, g, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bilinear", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, width)
    return torch.cat([prefix, grid], dim=0)


def _raise_recompile_limit(limit: int) -> None:
    """Let torch.compile keep at least `limit` graphs per function (its default, 8, is easily reached by
    progressive-resolution phases x masked sub-batch x train/eval, after which it silently runs eager)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)


def _forward_features(tower: "VisionTransformer", x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return tower._forward_features(x, mask)


def _forward_head(tower: "VisionTransformer", tokens: torch.Tensor) -> torch.Tensor:
    return tower._forward_head(tokens)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg = copy.deepcopy(cfg)
        cfg.validate()
        self.cfg = cfg
        self.preset_name = "custom"
        width = cfg.width
        self.patch_size = cfg.patch_size
        self.width = width
        self.num_prefix_tokens = 1 if cfg.use_cls_token else 0
        self.posemb_grid = cfg.grid_size  # side of the stored (native) posemb grid

        if cfg.stem == "patch":
            self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
            self.stem = None
        else:  # our conv stem (tiny preset): stride 8 from three 3x3 stride-2 convs
            self.conv1 = None
            self.stem = nn.Sequential(OrderedDict([
                ("0", nn.Conv2d(3, width // 4, kernel_size=3, stride=2, padding=1)),
                ("1", nn.GELU()),
                ("2", nn.Conv2d(width // 4, width // 2, kernel_size=3, stride=2, padding=1)),
                ("3", nn.GELU()),
                ("4", nn.Conv2d(width // 2, width, kernel_size=3, stride=2, padding=1)),
            ]))

        self.class_embedding = nn.Parameter(torch.empty(width)) if cfg.use_cls_token else None
        n_pos = self.num_prefix_tokens + self.posemb_grid ** 2
        self.positional_embedding = nn.Parameter(torch.empty(n_pos, width)) if cfg.use_abs_posemb else None
        self.mask_token = nn.Parameter(torch.empty(width)) if cfg.use_mask_token else None
        self.rope = Rope2D(width // cfg.heads, cfg.use_cls_token, cfg.rope_theta) if cfg.use_rope else None

        self.ln_pre = nn.LayerNorm(width, eps=cfg.ln_eps)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_dim, ls_init_value=cfg.ls_init_value,
                                       drop_path=cfg.drop_path, ln_eps=cfg.ln_eps,
                                       grad_checkpointing=cfg.grad_checkpointing)
        self.ln_post = nn.LayerNorm(width, eps=cfg.ln_eps) if cfg.use_ln_post else None
        self.attn_pool = (AttentionPooling(width, cfg.attn_pool_heads, cfg.attn_pool_mlp_ratio, cfg.ln_eps)
                          if cfg.pool_type == "attn" else None)
        self.proj = nn.Parameter(torch.empty(width, cfg.output_dim)) if cfg.output_dim is not None else None
        self.init_weights()

    # ------------------------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Meta's scheme for embeddings and proj (randn * width^-0.5), CLIP's for the blocks; conv1 keeps
        PyTorch's default init (as Meta); mask token N(0, 0.02)."""
        scale = self.width ** -0.5
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding, std=scale)
        if self.positional_embedding is not None:
            nn.init.normal_(self.positional_embedding, std=scale)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        if self.proj is not None:
            nn.init.normal_(self.proj, std=scale)
        self.transformer.init_weights()
        if self.attn_pool is not None:
            self.attn_pool.init_weights()
        if self.stem is not None:
            self._init_stem()

    def _init_stem(self) -> None:
        """He init for the conv stem (gain for the GELUs between convs, linear for the last). PyTorch's
        default conv init shrinks the signal ~3x per conv: after three, image content (std ~0.04) sat below
        the position embedding (~0.09) and the tiny model learnt colour but not shape."""
        convs = [m for m in self.stem if isinstance(m, nn.Conv2d)]
        for index, conv in enumerate(convs):
            last = index == len(convs) - 1
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear" if last else "relu")
            nn.init.zeros_(conv.bias)

    @property
    def layers(self) -> int:
        return len(self.transformer.resblocks)

    @property
    def output_dim(self) -> int:
        """Size of `forward` / `forward_head` output features."""
        return self.proj.shape[1] if self.proj is not None else self.width

    def grid_size(self, height: int, width: Optional[int] = None) -> Tuple[int, int]:
        """Token grid (grid_h, grid_w) of an input of height x width pixels (multiples of the patch size)."""
        width = height if width is None else width
        p = self.patch_size
        if height % p or width % p or height <= 0 or width <= 0:
            raise ValueError(f"input size {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def abs_posemb(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[prefix + grid_h * grid_w, W] absolute posemb for a grid (resized bilinearly off the native one)."""
        return resample_posemb(self.positional_embedding, self.num_prefix_tokens, (grid_h, grid_w))

    # ------------------------------------------------------------------------------------------------------
    # torch.compile
    _compiled_features = None  # set by compile(): the compiled `_forward_features` / `_forward_head`
    _compiled_head = None

    def compile(self, *args, **kwargs) -> None:
        """torch.compile the tower in place (state-dict keys unchanged; arguments as for `torch.compile`).

        `nn.Module.compile` only compiles `__call__`, but the stages call `forward_features` and `forward_head`
        directly (the pretrain stage needs the tokens for mask regularization), so those two entry points are
        compiled here, each into one graph; `forward` (and `__call__`) goes through them. The compiled functions
        take the module as an argument rather than binding it, so a `copy.deepcopy` of a compiled tower (a
        frozen teacher) runs its own weights. The recompile limit is raised to at least 64, so progressive
        resolution phases x (full batch, masked sub-batch) x (train, eval) stay compiled."""
        _raise_recompile_limit(64)
        self._compiled_features = torch.compile(_forward_features, *args, **kwargs)
        self._compiled_head = torch.compile(_forward_head, *args, **kwargs)

    @property
    def is_compiled(self) -> bool:
        return self._compiled_features is not None

    def _embed(self, x: torch.Tensor, mask: Optional[torch.Tensor]):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        grid_h, grid_w = self.grid_size(x.shape[-2], x.shape[-1])
        x = self.conv1(x) if self.conv1 is not None else self.stem(x)
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, W], row-major (h, w)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("a patch mask was given but this tower has no mask token "
                                 "(build it with vision.use_mask_token=True or call add_mask_token())")
            if tuple(mask.shape) != (batch, grid_h * grid_w):
                raise ValueError(f"mask must be [B, grid_h*grid_w] = [{batch}, {grid_h * grid_w}], "
                                 f"got {tuple(mask.shape)}")
            x = torch.where(mask.to(torch.bool).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1), x], dim=1)
        if self.positional_embedding is not None:
            x = x + self.abs_posemb(grid_h, grid_w).to(x.dtype)
        rope = self.rope(grid_h, grid_w, x.device) if self.rope is not None else None
        x = self.ln_pre(x)
        return x, rope, (grid_h, grid_w)

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens [B, prefix + gh*gw, W] after the last block (and `ln_post` where present)."""
        if self._compiled_features is not None and not torch.compiler.is_compiling():
            return self._compiled_features(self, x, mask)
        return self._forward_features(x, mask)

    def _forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, rope, _ = self._embed(x, mask)
        x = self.transformer(x, rope=rope)
        if self.ln_post is not None:
            x = self.ln_post(x)
        return x

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention pooling + proj where present: [B, out]. Without a pooling head the tokens pass
        through (projected by `proj` if there is one), as in Meta's code."""
        if self._compiled_head is not None and not torch.compiler.is_compiling():
            return self._compiled_head(self, tokens)
        return self._forward_head(tokens)

    def _forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        if self.attn_pool is not None:
            x = self.attn_pool(x)
        elif self.cfg.pool_type == "tok":  # the vanilla-CLIP baseline (not a PE layout): the class token
            x = x[:, 0]
        if self.proj is not None:
            x = x @ self.proj
        return x

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask=mask))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            return_prefix_tokens: bool = False,
            mask: Optional[torch.Tensor] = None,
            stop_early: bool = False,
    ):
        """timm's convention. indices: None = all blocks, int n = the last n blocks, list = these block
        indices (0-based, negative from the end; returned in block order). Intermediate i is the output of
        block i (= "layer i+1"); `norm` applies `ln_post` (if present) to each. output_fmt 'NCHW' gives
        [B, W, gh, gw] patch maps, 'NLC' [B, gh*gw, W]; prefix (class) tokens are split off and returned as
        (patch, prefix [B, prefix, W]) pairs when `return_prefix_tokens`. Returns the list if
        `intermediates_only`, else (final tokens as `forward_features` gives them, list)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.layers, indices)
        batch = x.shape[0]
        x, rope, (grid_h, grid_w) = self._embed(x, mask)
        blocks = self.transformer.resblocks
        if stop_early:
            blocks = blocks[:max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            x = self.transformer.run_block(block, x, rope)
            if i in take_indices:
                intermediates.append(self.ln_post(x) if (norm and self.ln_post is not None) else x)

        npt = self.num_prefix_tokens
        prefix_tokens = [y[:, :npt] for y in intermediates]
        intermediates = [y[:, npt:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        if self.ln_post is not None:
            x = self.ln_post(x)
        return x, intermediates

    # ------------------------------------------------------------------------------------------------------
    # structural edits used by the alignment stages
    def truncate(self, k: int) -> "VisionTransformer":
        """Keep the first k blocks (layer k = output after k blocks, 1-based); drop ln_post, attn_pool, proj.
        In place; returns self. `cfg.truncated_from` records the depth cut from."""
        depth = self.layers
        if not 1 <= int(k) <= depth:
            raise ValueError(f"truncate(k): k must be in 1..{depth}, got {k}")
        self.transformer.resblocks = self.transformer.resblocks[:k]
        self.ln_post = None
        self.attn_pool = None
        self.proj = None
        cfg = self.cfg
        cfg.truncated_from = cfg.truncated_from if cfg.truncated_from is not None else depth
        cfg.layers = int(k)
        cfg.pool_type = "none"
        cfg.use_ln_post = False
        cfg.output_dim = None
        return self

    def set_layer_scale(self, init: float = 0.1) -> "VisionTransformer":
        """Add LayerScale (gamma = init) to every block that has none (existing gammas are kept)."""
        for block in self.transformer.resblocks:
            block.set_layer_scale(init)
        if self.cfg.ls_init_value is None:
            self.cfg.ls_init_value = float(init)
        return self

    def rescale_layer_scale(self, value: float) -> "VisionTransformer":
        """Every block's gammas to `value`, function-preserving (the branch output projections absorb the
        change; ResidualAttentionBlock.rescale_layer_scale). Float rounding aside, the tower's outputs stay."""
        if value <= 0:
            raise ValueError(f"a function-preserving LayerScale needs a positive gamma, got {value}")
        for block in self.transformer.resblocks:
            block.rescale_layer_scale(value)
        self.cfg.ls_init_value = float(value)
        return self

    def set_drop_path(self, rate: float) -> "VisionTransformer":
        """timm DropPath with one constant rate in every block (0 removes it)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        for block in self.transformer.resblocks:
            block.set_drop_path(rate)
        self.cfg.drop_path = float(rate)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> "VisionTransformer":
        self.transformer.grad_checkpointing = bool(enable)
        self.cfg.grad_checkpointing = bool(enable)
        return self

    def add_mask_token(self, std: float = 0.02) -> "VisionTransformer":
        """Add a learned `mask_token` [W] (N(0, std)) if the tower has none, e.g. after loading a Meta file."""
        if self.mask_token is None:
            ref = self.ln_pre.weight
            self.mask_token = nn.Parameter(torch.randn(self.width, device=ref.device, dtype=ref.dtype) * std)
            self.cfg.use_mask_token = True
        return self

    def set_image_size(self, image_size: int) -> "VisionTransformer":
        """Make `image_size` the native resolution: resample the stored posemb grid to it (Meta's bilinear
        rule). Any multiple of the patch size already works at run time without this."""
        grid_h, grid_w = self.grid_size(image_size)
        if self.positional_embedding is not None and grid_h != self.posemb_grid:
            with torch.no_grad():
                new = resample_posemb(self.positional_embedding.data, self.num_prefix_tokens, (grid_h, grid_w))
            self.positional_embedding = nn.Parameter(new.contiguous(),
                                                     requires_grad=self.positional_embedding.requires_grad)
        self.posemb_grid = grid_h
        self.cfg.image_size = int(image_size)
        return self
