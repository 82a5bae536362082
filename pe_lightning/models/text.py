"""OpenAI-CLIP text transformer as PE uses it (PE_REFERENCE.md section 3), Meta's names at top level:
`token_embedding`, `positional_embedding`, `transformer.resblocks.*`, `ln_final`, `text_projection`.

Causal self-attention (SDPA `is_causal`), exact GELU, LayerNorm eps 1e-5, pooled at the position of the
highest token id (EOT 49407), then `@ text_projection` [W, out] (no bias).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Transformer
from .presets import TextConfig


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self._build_text(cfg)

    def _build_text(self, cfg: TextConfig) -> None:
        cfg = copy.deepcopy(cfg)
        cfg.validate()
        self.text_cfg = cfg
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.pad_id = cfg.pad_id
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, ln_eps=cfg.ln_eps,
                                       grad_checkpointing=cfg.grad_checkpointing)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.output_dim))
        self.init_text_weights()

    def init_text_weights(self) -> None:
        """CLIP's init (open_clip `TextTransformer.init_parameters`)."""
        width = self.text_cfg.width
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token features [B, L, W] after `ln_final` (before pooling and projection)."""
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids [B, L], got shape {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"token sequence of length {length} exceeds the context length {self.context_length}")
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding[:length].to(x.dtype)
        x = self.transformer(x, is_causal=True)
        return self.ln_final(x)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, L] token ids -> [B, out] projected features (pooled at the EOT = argmax id)."""
        x = self.text_tokens(tokens)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)

    def set_text_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = bool(enable)
        self.text_cfg.grad_checkpointing = bool(enable)


__all__ = ["TextTransformer"]
