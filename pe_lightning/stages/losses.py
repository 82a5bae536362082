"""Losses of the PE stages: CLIP contrastive loss (with a gradient-carrying all-gather), MaskFeat-style
mask regularisation, and soft-target CLIP distillation (PE_REFERENCE.md s.3 and s.6).

Distributed convention (read this before changing anything here)
----------------------------------------------------------------
`clip_loss` on each of N ranks with local batch b computes the loss of its **local rows** against the
**global columns** (all ranks' features, gathered with `gather_with_grad`), averaged over its b local
rows, both directions:

    L_r = 1/2 * [ mean_{i in rank r} CE(image_i -> all texts) + mean_{j in rank r} CE(text_j -> all images) ]

The single-process loss on the concatenated batch (N*b pairs) is exactly the mean of the per-rank
losses, L = (1/N) sum_r L_r. `gather_with_grad`'s backward **sums** the gradients that every rank's loss
sends to a rank's features (reduce-scatter with SUM), so the parameter gradient on rank r is
sum_{r'} dL_{r'}/dtheta restricted to rank r's samples, and DDP's average over ranks yields
(1/N) sum_r sum_{r'} ... = dL/dtheta: **after DDP's averaging, every parameter gradient (towers and the
temperature) equals the single-process gradient on the concatenated batch.** Log the mean of the
per-rank losses (Lightning's `sync_dist=True`) to get the single-process loss value.
Consequence worth knowing: the gradient w.r.t. the *activations* (the features themselves) on a rank is
N times the single-process one, because DDP's 1/N is only applied later, to parameter gradients.
This holds for any N; all ranks must use the same local batch size.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "gather_with_grad",
    "clip_loss",
    "clamp_logit_scale",
    "mask_feature_loss",
    "soft_clip_distill_loss",
]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        world = dist.get_world_size()
        ctx.rank, ctx.world, ctx.local = dist.get_rank(), world, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() in ("nccl", "xccl"):
            out = torch.empty((ctx.local,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        # gloo and others: no reduce-scatter everywhere; all-reduce then keep this rank's slice.
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, ctx.rank * ctx.local, ctx.local).contiguous()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [b, ...] from all ranks along dim 0 -> [N*b, ...], in rank order.

    The local slice keeps its autograd history and the backward sums the gradients that all ranks send to
    this rank's slice (see the module docstring for why that is the right convention under DDP).
    Identity when torch.distributed is not initialised or the world size is 1. Every rank must pass the
    same shape.
    """
    if not _distributed():
        return x
    return _GatherWithGrad.apply(x)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Half-precision features are promoted to fp32 for the logits / softmax; fp32 and fp64 stay as they are.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """Symmetric CLIP (InfoNCE) loss of paired features, optionally across all ranks.

    Args:
        image_features, text_features: [b, D] local features of b matching pairs (row i matches row i),
            un-normalised model outputs; they are L2-normalised here unless `normalize=False`.
            Half-precision inputs are computed in fp32.
        logit_scale: the **log** temperature parameter (the model's `logit_scale`, init log(1/0.07));
            logits use exp(logit_scale). Keep it <= log(100) with `clamp_logit_scale` after each step.
        gather: gather both towers' features from all ranks (with gradients) and contrast the local rows
            against the global batch. No-op when not distributed.
        normalize: L2-normalise the features first (default). Pass False if they already are.

    Returns:
        Scalar loss: 1/2 (CE image->text + CE text->image), each averaged over the local rows, with labels
        = local index + rank * b. The mean over ranks equals the single-process loss of the concatenated
        batch, and DDP-averaged gradients equal its gradients (module docstring).
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"clip_loss expects two [b, D] tensors of the same shape, got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    img, txt = _upcast(image_features), _upcast(text_features)
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    b = img.shape[0]
    rank = 0
    if gather and _distributed():
        all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
        rank = dist.get_rank()
    else:
        all_img, all_txt = img, txt
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=img.device)
    scale = logit_scale.to(img.dtype).exp()
    logits_per_image = scale * img @ all_txt.t()  # [b, N*b]
    logits_per_text = scale * txt @ all_img.t()  # [b, N*b]
    labels = torch.arange(b, device=img.device) + rank * b
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


@torch.no_grad()
def clamp_logit_scale(param: torch.Tensor, max_scale: float = 100.0, min_scale: Optional[float] = None) -> None:
    """Clamp the log-temperature parameter in place so that exp(param) <= max_scale (CLIP uses 100).

    `min_scale` (optional) also bounds it from below (exp(param) >= min_scale). Call after each optimizer step.
    """
    lo = None if min_scale is None else math.log(min_scale)
    param.clamp_(min=lo, max=math.log(max_scale))


def mask_feature_loss(
    masked_tokens: torch.Tensor,
    target_tokens: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MaskFeat-style regularisation: mean over tokens of 1 - cos(masked output, unmasked output).

    Args:
        masked_tokens: [B, T, W] token outputs of the tower on the masked images (gradient flows here).
        target_tokens: [B, T, W] token outputs on the same images unmasked; **detached here** (the target
            receives no gradient).
        mask: optional bool [B, T'] with T' <= T, True where a patch was replaced by the mask token. When
            given, the loss averages only over the masked positions; when T' < T, the first T - T' tokens are
            prefix tokens (the class token, which is never masked) and are left out. Default (None): average
            over **all** tokens, class token included. Which to use is not published; the default (all
            tokens) is our choice: it pulls the whole masked-view representation to the clean one.

    Returns:
        Scalar in [0, 2]; 0 iff every averaged token pair points the same way. With an all-False mask the
        result is 0 (still attached to the graph).
    """
    if masked_tokens.shape != target_tokens.shape:
        raise ValueError(
            f"mask_feature_loss: masked_tokens {tuple(masked_tokens.shape)} and target_tokens "
            f"{tuple(target_tokens.shape)} differ in shape"
        )
    x, t = _upcast(masked_tokens), _upcast(target_tokens).detach()
    dissim = 1.0 - F.cosine_similarity(x, t, dim=-1, eps=1e-6)  # [B, T]
    if mask is None:
        return dissim.mean()
    if mask.ndim != 2 or mask.shape[0] != dissim.shape[0] or mask.shape[1] > dissim.shape[1]:
        raise ValueError(
            f"mask_feature_loss: mask {tuple(mask.shape)} does not fit tokens {tuple(masked_tokens.shape)}; "
            "expected [B, T'] with T' <= T (prefix tokens first)"
        )
    prefix = dissim.shape[1] - mask.shape[1]
    m = mask.to(dissim.dtype)
    return (dissim[:, prefix:] * m).sum() / m.sum().clamp(min=1.0)


def soft_clip_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Soft-target distillation of CLIP similarity distributions: KL(teacher || student) per row.

    Both inputs are [rows, classes] logits (for CLIP: the temperature-scaled image->text similarity matrix;
    call again with the transposes for text->image and average). Each row is turned into a distribution
    with softmax(logits / temperature); the teacher is detached. Returns the mean over rows of
    KL(p_teacher || p_student) times temperature**2 (Hinton's convention, which keeps the gradient
    magnitude independent of the temperature). KL differs from soft cross-entropy only by the teacher's
    entropy, a constant, so gradients are the same; KL is 0 when the distributions match.
    The temperature is not published (PE_REFERENCE.md s.6): a recipe key.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"soft_clip_distill_loss: student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)} logits differ in shape"
        )
    if temperature <= 0:
        raise ValueError(f"soft_clip_distill_loss: temperature must be > 0, got {temperature}")
    s = _upcast(student_logits) / temperature
    t = _upcast(teacher_logits).detach() / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl.mean() * temperature**2
