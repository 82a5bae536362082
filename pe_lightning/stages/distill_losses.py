"""CLIP-style distillation of a frozen teacher into a student (issue 12; PE_REFERENCE.md s.7, STAGE_ANCHORS s.2).

Within a batch, the student's image->text and text->image similarity distributions are trained toward the
teacher's (soft targets), optionally beside the student's own contrastive loss and a feature term:

    total = distill_weight * D + contrastive_weight * C + feature_weight * F

    D = 1/2 [ softCE(p_T(image->text), q_S(image->text)) + softCE(p_T(text->image), q_S(text->image)) ]
        softCE(p, q) = mean over rows of -sum_j p_j log q_j     (>= H(p), equal iff q == p)
        q_S = softmax(s_S * <student image_i, student text_j>),  s_S = exp(student logit_scale) (learned)
        p_T = softmax(s_T * <teacher image_i, teacher text_j>),  s_T = the **temperature mode**:
              teacher_scale=None  -> exp(teacher logit_scale): each model its own scale (open_clip's
                                     `DistillClipLoss`, CLIP-KD)
              teacher_scale=100.0 -> fixed (MobileCLIP); 50.0 as TinyCLIP
    C = the CLIP loss of the student's own features (`clip_loss`)
    F = MSE(normalise(P(student image)), normalise(teacher image)), mean over the b x D_T elements (CLIP-KD's
        FD term, whose published weight 2000 is for this mean); P = identity when the widths agree, else a
        learned `FeatureProjector` student -> teacher width.

All features are un-normalised model outputs, normalised here. D is computed as KL(p_T || q_S) with the
existing `soft_clip_distill_loss` (temperature 1: the scales are already in the logits) plus the teacher's
entropy, a constant: the value is the soft cross-entropy open_clip reports, the gradient that of the KL.
The teacher side is detached. Which of these choices PE used is not published: every weight and the
temperature mode are recipe keys ("our choice" defaults are the stage's, not this module's).

Distributed convention: the same as `clip_loss` (read `pe_lightning.stages.losses`). Student and teacher
features are gathered from every rank (the student's with `gather_with_grad`); each rank computes its b
local rows against the N*b global columns, so the soft targets are distributions over the **global** batch.
The mean of the per-rank losses equals the single-process loss on the concatenated batch, and after DDP's
gradient averaging every parameter gradient (student towers, logit scale, projector) equals the
single-process one. The feature term is per sample (no gather needed): its per-rank mean averages to the
global mean the same way. All ranks must use the same local batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pe_lightning.config import RecipeError
from pe_lightning.stages.losses import gather_with_grad, soft_clip_distill_loss

__all__ = [
    "DistillWidthError",
    "DistillLossOutput",
    "FeatureProjector",
    "ClipDistillLoss",
    "clip_distill_loss",
    "soft_cross_entropy",
]

Scale = Union[float, torch.Tensor]


class DistillWidthError(RecipeError):
    """The feature term compares embeddings of different widths and no projection is configured."""


@dataclass
class DistillLossOutput:
    """The weighted total (what to backpropagate) and its unweighted parts (what to log)."""

    total: torch.Tensor
    distill: torch.Tensor  # D: soft CE, both directions averaged
    contrastive: torch.Tensor  # C: the student's own CLIP loss (computed only when its weight is > 0)
    feature: torch.Tensor  # F: MSE of normalised image embeddings (computed only when its weight is > 0)
    teacher_scale: torch.Tensor  # s_T actually used (for logging)


class FeatureProjector(nn.Module):
    """Learned linear map student embedding [.., D_S] -> teacher width [.., D_T] for the feature term.

    A bias, as CLIP-KD's `visual_proj`; default PyTorch init. It is a trained part of the stage (its
    parameters belong in the optimizer and the checkpoint) but not of the exported student."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)
        self.proj = nn.Linear(self.student_dim, self.teacher_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j softmax(teacher)_j * log_softmax(student)_j, teacher detached.

    = KL(teacher || student) (the existing `soft_clip_distill_loss` at temperature 1) + H(teacher); its
    minimum over student logits is the teacher's mean row entropy, reached when the rows match."""
    kl = soft_clip_distill_loss(student_logits, teacher_logits, temperature=1.0)
    log_p = F.log_softmax(_upcast(teacher_logits).detach(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1).mean()
    return kl + entropy


def _width_error(student_dim: int, teacher_dim: int) -> DistillWidthError:
    return DistillWidthError(
        f"distillation feature term: the student's image embedding is {student_dim} wide, the teacher's "
        f"{teacher_dim}; the MSE needs equal widths. Enable the learned student->teacher projection "
        f"(FeatureProjector({student_dim}, {teacher_dim})) or set the feature weight to 0")


def _as_scale(value: Scale, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(value), device=like.device, dtype=like.dtype)


def clip_distill_loss(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    student_logit_scale: Scale,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    teacher_logit_scale: Optional[Scale] = None,
    *,
    teacher_scale: Optional[float] = None,
    distill_weight: float = 1.0,
    contrastive_weight: float = 1.0,
    feature_weight: float = 0.0,
    projector: Optional[nn.Module] = None,
    gather: bool = True,
) -> DistillLossOutput:
    """The distillation objective of the module docstring for one (local) batch.

    Args:
        student_image, student_text: [b, D_S] un-normalised student embeddings of b matching pairs.
        student_logit_scale: the student's **log** temperature parameter (learned; logits use its exp).
        teacher_image, teacher_text: [b, D_T] un-normalised teacher embeddings of the same pairs (online or
            from the cache); detached here. D_T may differ from D_S (the similarity matrices are b x N*b
            either way) except for the feature term.
        teacher_logit_scale: the teacher's **log** temperature; used when `teacher_scale` is None.
        teacher_scale: None = the teacher's own scale exp(teacher_logit_scale) (open_clip); a float = that
            fixed scale, **not** a log (100 = MobileCLIP, 50 = TinyCLIP), whatever the teacher's own.
        distill_weight, contrastive_weight, feature_weight: the weights of D, C and F (>= 0);
            contrastive_weight=0 is pure distillation (TinyCLIP). Terms with weight 0 are not computed
            (reported as 0).
        projector: student -> teacher width map for F (a `FeatureProjector`); None = identity, which needs
            D_S == D_T (else `DistillWidthError` naming both widths).
        gather: use the global batch under torch.distributed (module docstring). No-op otherwise.
    """
    for name, w in (("distill_weight", distill_weight), ("contrastive_weight", contrastive_weight),
                    ("feature_weight", feature_weight)):
        if not w >= 0:
            raise RecipeError(f"distillation: {name} must be >= 0, got {w}")
    if student_image.shape != student_text.shape or student_image.ndim != 2:
        raise ValueError(f"clip_distill_loss: student image {tuple(student_image.shape)} and text "
                         f"{tuple(student_text.shape)} must both be [b, D_S]")
    if teacher_image.shape != teacher_text.shape or teacher_image.shape[0] != student_image.shape[0]:
        raise ValueError(f"clip_distill_loss: teacher image {tuple(teacher_image.shape)} and text "
                         f"{tuple(teacher_text.shape)} must both be [b, D_T] with b = {student_image.shape[0]}")
    s_img_raw = _upcast(student_image)
    s_img, s_txt = F.normalize(s_img_raw, dim=-1), F.normalize(_upcast(student_text), dim=-1)
    t_img = F.normalize(_upcast(teacher_image).detach(), dim=-1)
    t_txt = F.normalize(_upcast(teacher_text).detach(), dim=-1)

    if teacher_scale is not None:
        if not float(teacher_scale) > 0:
            raise RecipeError(f"distillation: teacher_scale must be > 0 (a scale such as 100, not a log), "
                              f"got {teacher_scale}")
        t_scale = _as_scale(float(teacher_scale), t_img)
    elif teacher_logit_scale is None:
        raise ValueError("clip_distill_loss: teacher_scale=None uses the teacher's own logit scale; pass "
                         "teacher_logit_scale (the teacher's log temperature) or a fixed teacher_scale")
    else:
        t_scale = _as_scale(teacher_logit_scale, t_img).detach().exp()
    s_scale = _as_scale(student_logit_scale, s_img).exp()

    b = s_img.shape[0]
    rank = 0
    if gather and _distributed():
        all_s_img, all_s_txt = gather_with_grad(s_img), gather_with_grad(s_txt)
        with torch.no_grad():
            all_t_img, all_t_txt = gather_with_grad(t_img), gather_with_grad(t_txt)
        rank = dist.get_rank()
    else:
        all_s_img, all_s_txt, all_t_img, all_t_txt = s_img, s_txt, t_img, t_txt

    # local rows x global columns, as clip_loss
    s_per_image, s_per_text = s_scale * s_img @ all_s_txt.t(), s_scale * s_txt @ all_s_img.t()
    zero = s_per_image.new_zeros(())
    distill = contrastive = feature = zero
    if distill_weight > 0:
        t_per_image, t_per_text = t_scale * t_img @ all_t_txt.t(), t_scale * t_txt @ all_t_img.t()
        distill = 0.5 * (soft_cross_entropy(s_per_image, t_per_image) + soft_cross_entropy(s_per_text, t_per_text))
    if contrastive_weight > 0:
        # clip_loss's formula on the logits already computed (saves a second gather of the student features)
        labels = torch.arange(b, device=s_img.device) + rank * b
        contrastive = 0.5 * (F.cross_entropy(s_per_image, labels) + F.cross_entropy(s_per_text, labels))
    if feature_weight > 0:
        feature = feature_mse(s_img_raw, t_img, projector)
    total = distill_weight * distill + contrastive_weight * contrastive + feature_weight * feature
    return DistillLossOutput(total=total, distill=distill.detach(), contrastive=contrastive.detach(),
                             feature=feature.detach(), teacher_scale=t_scale.detach())


def feature_mse(student_image: torch.Tensor, teacher_image: torch.Tensor,
                projector: Optional[nn.Module] = None) -> torch.Tensor:
    """CLIP-KD's FD term: MSE (mean over elements) of normalise(projector(student)) and normalise(teacher).

    `student_image` [b, D_S] un-normalised (the projection acts before normalising, as CLIP-KD);
    `teacher_image` [b, D_T], detached. Raises `DistillWidthError` when D_S != D_T without a projector."""
    d_s, d_t = student_image.shape[-1], teacher_image.shape[-1]
    if projector is None:
        if d_s != d_t:
            raise _width_error(d_s, d_t)
        x = student_image
    else:
        x = projector(student_image)
        if x.shape[-1] != d_t:
            raise _width_error(x.shape[-1], d_t)
    s = F.normalize(_upcast(x), dim=-1)
    t = F.normalize(_upcast(teacher_image).detach(), dim=-1)
    return F.mse_loss(s, t)


class ClipDistillLoss(nn.Module):
    """`clip_distill_loss` with its recipe choices fixed, owning the optional `FeatureProjector`.

    Construction checks the widths up front (a stage builds this in `build_model`, before any step), so a
    teacher whose embedding width differs from the student's fails at start with `DistillWidthError` when
    the feature term is on and `feature_projection` is off. `feature_projection=True` with equal widths
    still learns a (square) projection: our choice to honour the request rather than silently drop it."""

    def __init__(self, student_dim: int, teacher_dim: int, *, teacher_scale: Optional[float] = None,
                 distill_weight: float = 1.0, contrastive_weight: float = 1.0, feature_weight: float = 0.0,
                 feature_projection: bool = False, gather: bool = True):
        super().__init__()
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)
        self.teacher_scale = None if teacher_scale is None else float(teacher_scale)
        self.distill_weight = float(distill_weight)
        self.contrastive_weight = float(contrastive_weight)
        self.feature_weight = float(feature_weight)
        self.gather = bool(gather)
        self.projector: Optional[FeatureProjector] = None
        if self.feature_weight > 0:
            if feature_projection:
                self.projector = FeatureProjector(self.student_dim, self.teacher_dim)
            elif self.student_dim != self.teacher_dim:
                raise _width_error(self.student_dim, self.teacher_dim)

    def forward(self, student_image: torch.Tensor, student_text: torch.Tensor, student_logit_scale: Scale,
                teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                teacher_logit_scale: Optional[Scale] = None) -> DistillLossOutput:
        return clip_distill_loss(
            student_image, student_text, student_logit_scale, teacher_image, teacher_text, teacher_logit_scale,
            teacher_scale=self.teacher_scale, distill_weight=self.distill_weight,
            contrastive_weight=self.contrastive_weight, feature_weight=self.feature_weight,
            projector=self.projector, gather=self.gather)

    def extra_repr(self) -> str:
        scale = "teacher's own" if self.teacher_scale is None else f"fixed {self.teacher_scale:g}"
        return (f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, teacher_scale={scale}, "
                f"weights(distill={self.distill_weight:g}, contrastive={self.contrastive_weight:g}, "
                f"feature={self.feature_weight:g})")
