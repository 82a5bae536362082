"""Optimizers, weight-decay parameter groups and the learning-rate schedule of the PE stages.

PE pretraining uses LAMB (lr 2e-3 in the ViT-L ablation; AdamW was 5e-4, PE_REFERENCE.md s.6). LAMB betas,
eps, warmup and weight decay are **not published**: they are recipe keys, and the defaults here are our
choice.

The schedule is a function of **samples seen** (global, summed over ranks), not of optimizer steps, so it
does not move when the batch size changes between progressive phases, and it is stateless: resuming with
the same samples-seen counter gives exactly the same learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "NO_DECAY_NAMES",
    "no_weight_decay",
    "param_groups",
    "build_optimizer",
    "OPTIMIZERS",
    "WarmupCosine",
    "set_lr",
]

# Parameter names (last dotted component, or a full suffix) that never get weight decay, whatever their
# shape: embeddings, learned tokens/queries and the temperature (Meta's module names, PE_REFERENCE.md s.5).
NO_DECAY_NAMES: tuple[str, ...] = (
    "class_embedding",
    "positional_embedding",
    "token_embedding.weight",
    "mask_token",
    "attn_pool.probe",
    "logit_scale",
)


def no_weight_decay(name: str, param: torch.Tensor, extra: Iterable[str] = ()) -> bool:
    """True if parameter `name` should be excluded from weight decay.

    Rules: every parameter with ndim <= 1 (biases, LayerNorm weights, LayerScale `gamma`, the 1-D
    `class_embedding`, the scalar `logit_scale`), plus any parameter whose dotted name equals or ends
    with one of `NO_DECAY_NAMES` or `extra` (embeddings such as the 2-D `positional_embedding`, the
    `token_embedding.weight` table, `mask_token`, the 3-D `attn_pool.probe`), matched on whole dotted
    components (`x.mask_token` matches `mask_token`; `x.my_mask_token` does not). Names ending in `.bias`
    are excluded too whatever their shape. Everything else (linear / conv / projection matrices) decays.
    """
    if param.ndim <= 1 or name.endswith(".bias") or name == "bias":
        return True
    for suffix in (*NO_DECAY_NAMES, *extra):
        if name == suffix or name.endswith("." + suffix):
            return True
    return False


def param_groups(
    model: nn.Module, weight_decay: float, extra_no_decay: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Split the trainable parameters of `model` into a decayed and a non-decayed group (`no_weight_decay`).

    Returns a list of optimizer param-group dicts with keys `params`, `weight_decay`, `group_name`
    ('decay' | 'no_decay'), `param_names` (for inspection) and `lr_scale` (1.0; `set_lr` multiplies the
    scheduled lr by it). Empty groups are omitted; frozen parameters (requires_grad False) are skipped.
    """
    extra = tuple(extra_no_decay)
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p, extra):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append(dict(params=decay, weight_decay=float(weight_decay), group_name="decay",
                           param_names=decay_names, lr_scale=1.0))
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0, group_name="no_decay",
                           param_names=no_decay_names, lr_scale=1.0))
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameters")
    return groups


OPTIMIZERS = ("lamb", "adamw")


def _all_cuda(groups: Sequence[dict[str, Any]]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def _any_sharded(groups: Sequence[dict[str, Any]]) -> bool:
    """Parameters sharded as DTensors (trainer.strategy=fsdp)."""
    return any(hasattr(p, "placements") for g in groups for p in g["params"])


def build_optimizer(
    model: Union[nn.Module, Sequence[dict[str, Any]]],
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-6,
    grad_clip: Optional[float] = None,
    compile: bool = False,
    always_adapt: bool = False,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer `name` over `param_groups(model, weight_decay)` (or over given param groups).

    - 'lamb': NVLAMB (NVIDIA FusedLAMB semantics, timm's defaults): global gradient-norm clipping at
      `grad_clip` inside the step, no trust-ratio adaptation for the weight_decay=0 group unless
      `always_adapt` (timm's name; recipe `optim.lamb_always_adapt`). With `compile`
      (recipe `optim.compile`, the default), our `FusedLamb`: a fused compiled update per tensor, no host
      syncs, ~3x faster than timm's on CPU and GPU. Without it, `timm.optim.Lamb`. The two agree to float
      rounding (tests/test_lamb.py) and share their state layout, so a run may switch between them. Sharded
      parameters (FSDP2) always get `FusedLamb` (eager without `compile`): it sums the norms over the shards.
    - 'adamw': `torch.optim.AdamW`, `fused=True` when every parameter is on CUDA, `foreach=True` otherwise.
      It does not clip: the Trainer does (`trainer_clip_value`).

    `kwargs` are passed to the optimizer's constructor. Parameters should already be on their device
    (Lightning calls `configure_optimizers` after moving the model). Betas/eps defaults are our choice.
    """
    key = name.lower().strip()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, weight_decay) if isinstance(model, nn.Module) else list(model)
    betas = (float(betas[0]), float(betas[1]))
    if key == "lamb":
        max_grad_norm = float(grad_clip) if grad_clip else None
        if compile or _any_sharded(groups):  # timm's Lamb would take a shard's norm for the weight's
            from pe_lightning.stages.lamb import FusedLamb

            return FusedLamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             max_grad_norm=max_grad_norm, compile=compile, always_adapt=always_adapt, **kwargs)
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                    always_adapt=always_adapt, **kwargs)
    if "fused" not in kwargs and "foreach" not in kwargs:
        if _all_cuda(groups):
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr to `lr * group['lr_scale']` (lr_scale defaults to 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup then cosine decay, as a function of samples seen.

    lr_at(s) = base_lr * s / warmup_samples                                     for s < warmup_samples
             = min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2, p = (s - warmup) / (total - warmup)
                                                                                 for warmup <= s < total
             = min_lr                                                            for s >= total
    with min_lr = min_lr_ratio * base_lr. So lr_at(0) = 0 (when warmup_samples > 0), lr_at(warmup) =
    base_lr, lr_at(total) = min_lr. Stateless: resume needs only the samples-seen counter.
    """

    base_lr: float
    warmup_samples: int
    total_samples: int
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.base_lr < 0:
            raise ValueError(f"WarmupCosine: base_lr must be >= 0, got {self.base_lr}")
        if self.total_samples <= 0:
            raise ValueError(f"WarmupCosine: total_samples must be > 0, got {self.total_samples}")
        if not 0 <= self.warmup_samples <= self.total_samples:
            raise ValueError(
                f"WarmupCosine: warmup_samples must be in [0, total_samples={self.total_samples}], "
                f"got {self.warmup_samples}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"WarmupCosine: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @property
    def min_lr(self) -> float:
        return self.base_lr * self.min_lr_ratio

    def lr_at(self, samples_seen: float) -> float:
        s = max(float(samples_seen), 0.0)
        if s < self.warmup_samples:
            return self.base_lr * s / self.warmup_samples
        if s >= self.total_samples:
            return self.min_lr
        progress = (s - self.warmup_samples) / (self.total_samples - self.warmup_samples)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    __call__ = lr_at
