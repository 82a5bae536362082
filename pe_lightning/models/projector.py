"""PE-Lang's vision-to-language projector: patch tokens -> the LM's input-embedding space.

    proj = Projector(in_dim=1024, out_dim=lm_embedding_width, pooling=2)
    image_embeds = proj(patch_tokens)        # [B, g*g, W] -> [B, (g//2)**2, D]
    save_projector(proj, export_dir)         # export_dir/projector.pt + projector.json
    proj = load_projector(export_dir, lm_width=lm_embedding_width)

Architecture (STAGE_ANCHORS.md s.3, PLM's `core/vision_projector/mlp.py`): `linear_1` Linear(W -> D, bias),
exact GELU, `linear_2` Linear(D -> D, bias). Parameter names are those of HuggingFace's PerceptionLM
`multi_modal_projector`, so `projector.pt` loads into it as it is.

Pooling (`pooling` = PLM's `pooling_ratio`): the tokens form a square g x g grid in row-major order (class
token already stripped); they are average-pooled to (g // r) x (g // r) with `adaptive_avg_pool2d`, as PLM
does: an exact r x r average when r divides g, PyTorch's adaptive (overlapping) windows otherwise.
`pool_at="after"` pools the projected tokens, PLM's order; `pool_at="before"` pools the vision tokens
first, which is r*r times cheaper in the MLP but is not PLM's function (GELU sits between): our option.

Init (our choice; PLM's config says only "gaussian"): both weights ~ N(0, 0.02^2) (the GPT-2 / timm std),
biases zero. With unit-scale vision features this gives image embeddings of the scale of the LM's token
embeddings (measured: output std 0.07 for W=192, 0.18 for W=1024, into D=576; SmolLM2-135M's token
embeddings have std 0.14), so the image tokens neither vanish nor swamp the text at the start of the warm-up.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from pe_lightning.io import torch_save_atomic, write_text_atomic
from pe_lightning.models.checkpoint import CheckpointError

__all__ = ["Projector", "pool_square_grid", "save_projector", "load_projector", "check_projector_width",
           "PROJECTOR_WEIGHTS", "PROJECTOR_CONFIG"]

PROJECTOR_WEIGHTS = "projector.pt"
PROJECTOR_CONFIG = "projector.json"
INIT_STD = 0.02  # our choice, see the module docstring
POOL_AT = ("after", "before")


def pool_square_grid(tokens: torch.Tensor, ratio: int) -> torch.Tensor:
    """[B, g*g, C] row-major grid tokens -> [B, (g//ratio)**2, C] by adaptive average pooling."""
    if ratio == 1:
        return tokens
    b, n, c = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"projector pooling needs a square token grid; got {n} tokens (was the class token "
                         "stripped?)")
    if g < ratio:
        raise ValueError(f"projector pooling ratio {ratio} is larger than the {g}x{g} token grid")
    grid = tokens.transpose(1, 2).reshape(b, c, g, g)
    pooled = F.adaptive_avg_pool2d(grid, (g // ratio, g // ratio))
    return pooled.flatten(2).transpose(1, 2)


class Projector(nn.Module):
    """Linear(in_dim -> out_dim) + GELU + Linear(out_dim -> out_dim), with optional grid pooling."""

    def __init__(self, in_dim: int, out_dim: int, pooling: int = 1, pool_at: str = "after",
                 init_std: float = INIT_STD):
        super().__init__()
        if int(pooling) < 1:
            raise ValueError(f"projector pooling ratio must be >= 1, got {pooling}")
        if pool_at not in POOL_AT:
            raise ValueError(f"projector pool_at must be one of {POOL_AT}, got {pool_at!r}")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.pooling, self.pool_at = int(pooling), pool_at
        self.linear_1 = nn.Linear(self.in_dim, self.out_dim, bias=True)
        self.gelu = nn.GELU()
        self.linear_2 = nn.Linear(self.out_dim, self.out_dim, bias=True)
        self.init_weights(init_std)

    def init_weights(self, std: float = INIT_STD) -> None:
        for layer in (self.linear_1, self.linear_2):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            nn.init.zeros_(layer.bias)

    def num_output_tokens(self, num_patches: int) -> int:
        """Image embeddings per image for `num_patches` (= g*g) input tokens."""
        g = math.isqrt(num_patches)
        if self.pooling == 1:
            return num_patches
        if g * g != num_patches:
            raise ValueError(f"projector pooling needs a square token grid; got {num_patches} tokens")
        return (g // self.pooling) ** 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, in_dim] patch tokens (no class token) -> [B, N', out_dim] image embeddings."""
        if tokens.shape[-1] != self.in_dim:
            raise ValueError(f"projector expects {self.in_dim}-wide vision tokens, got {tokens.shape[-1]}")
        if self.pool_at == "before":
            tokens = pool_square_grid(tokens, self.pooling)
        x = self.linear_2(self.gelu(self.linear_1(tokens)))
        if self.pool_at == "after":
            x = pool_square_grid(x, self.pooling)
        return x

    def no_weight_decay(self) -> tuple[str, ...]:
        """Parameter names without weight decay (timm's convention): the biases."""
        return tuple(name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] == "bias")

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "pooling": self.pooling, "pool_at": self.pool_at,
                "architecture": "linear_1 -> gelu -> linear_2 (HF PerceptionLM multi_modal_projector names)"}


def check_projector_width(projector: Projector, lm_width: int, where: str = "projector") -> None:
    """Raise CheckpointError when the projector's output width is not the LM's embedding width."""
    if projector.out_dim != int(lm_width):
        raise CheckpointError(
            f"{where} outputs {projector.out_dim}-wide embeddings but the LM's embedding width is {lm_width}: "
            "it was built for another LM; use the LM it was trained with (lang.lm) or train a new projector")


def save_projector(projector: Projector, out_dir: Union[str, os.PathLike]) -> Path:
    """Write `projector.pt` (state dict) and `projector.json` (its dims) into `out_dir`, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    torch_save_atomic(sd, out / PROJECTOR_WEIGHTS)
    write_text_atomic(out / PROJECTOR_CONFIG, json.dumps(projector.config(), indent=2) + "\n")
    return out / PROJECTOR_WEIGHTS


def load_projector(src: Union[str, os.PathLike], lm_width: int | None = None,
                   vision_width: int | None = None) -> Projector:
    """A Projector from a folder (or its `projector.pt`) written by `save_projector`; checks the widths."""
    path = Path(src)
    folder = path.parent if path.name == PROJECTOR_WEIGHTS else path
    weights, cfg_path = folder / PROJECTOR_WEIGHTS, folder / PROJECTOR_CONFIG
    for f in (weights, cfg_path):
        if not f.is_file():
            raise CheckpointError(f"projector file {f} is missing; point to a lang export folder that holds "
                                  f"{PROJECTOR_WEIGHTS} and {PROJECTOR_CONFIG}")
    try:
        cfg = json.loads(cfg_path.read_text())
        projector = Projector(cfg["in_dim"], cfg["out_dim"], cfg.get("pooling", 1), cfg.get("pool_at", "after"))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {type(e).__name__}: {e}; re-export the lang stage") from None
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        projector.load_state_dict(sd, strict=True)
    except Exception as e:  # truncated file, pickled objects, other keys or shapes
        raise CheckpointError(f"cannot load {weights}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if lm_width is not None:
        check_projector_width(projector, lm_width, where=str(weights))
    if vision_width is not None and projector.in_dim != int(vision_width):
        raise CheckpointError(f"{weights} expects {projector.in_dim}-wide vision tokens but the encoder is "
                              f"{vision_width} wide: it was built for another encoder")
    return projector
