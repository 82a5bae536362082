"""The two losses of the spatial stage (PE-Spatial, PE_REFERENCE.md s.6-7, STAGE_ANCHORS.md s.4).

Conventions shared by every function here
-----------------------------------------
- Tokens are **patch tokens only**, `[B, N, D]`, N = h * w of the token grid in row-major order (y outer,
  x inner), the order of the vision tower's patch sequence. The class token is the caller's business:
  drop it before calling (whether it carries a loss is a recipe choice, "our choice").
- Cosine similarities are computed in fp32 whatever the input dtype; vectors are L2-normalised with
  `F.normalize(eps=1e-6)`, so an all-zero token has similarity 0 with everything.
- Teacher / target tensors are **detached**: no gradient flows to a teacher.
- A token selection is a `[B, N]` bool (or 0/1 float) tensor; `token_selection` builds it from a patch
  mask for the three policies `visible | masked | all`.

1. `self_distill_loss`: the **negative** cosine similarity between each student token and the frozen
   copy's token at the same position (the paper's Eq. 2 lacks the minus sign; Meta confirmed it, PE issue
   #43), averaged over the selected tokens of the whole batch. Range [-1, 1]; -1 = perfect alignment.
2. `gram_mse_loss`: MSE between the student's per-image pairwise token cosine-similarity matrix and the
   target's (the SAM 2.1 mask-logit feature resized to the token grid), the loss shape of DINOv3's Gram
   anchoring. Range [0, 4]; 0 = identical similarity structure. Options: `remove_negative` (DINOv3's
   `remove_neg`: both matrices clamped at 0) and `centre` (each image's mean token subtracted first).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "TOKEN_POLICIES",
    "token_selection",
    "pairwise_similarity",
    "self_distill_loss",
    "standardise_by_teacher",
    "centre_tokens",
    "gram_mse_loss",
]

TOKEN_POLICIES = ("visible", "masked", "all")
_EPS = 1e-6


def token_selection(patch_mask: Optional[torch.Tensor], policy: str, shape: Optional[tuple] = None) -> torch.Tensor:
    """Which tokens carry a loss: `[B, N]` bool.

    Args:
        patch_mask: `[B, N]` bool, True where the student's input patch was masked (replaced by the mask
            token), or None when nothing was masked (then every token is visible).
        policy: "visible" (unmasked tokens), "masked" (masked tokens) or "all".
        shape: (B, N), needed only when `patch_mask` is None.
    """
    if policy not in TOKEN_POLICIES:
        raise ValueError(f"token policy must be one of {TOKEN_POLICIES}, got {policy!r}")
    if patch_mask is None:
        if shape is None:
            raise ValueError("token_selection: pass shape=(B, N) when patch_mask is None")
        patch_mask = torch.zeros(shape, dtype=torch.bool)
    patch_mask = patch_mask.bool()
    if policy == "all":
        return torch.ones_like(patch_mask)
    return patch_mask if policy == "masked" else ~patch_mask


def _check_tokens(name: str, x: torch.Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must be [B, N, D] patch tokens, got shape {tuple(x.shape)}")


def _weights(token_weight: Optional[torch.Tensor], b: int, n: int, device: torch.device) -> torch.Tensor:
    if token_weight is None:
        return torch.ones(b, n, device=device)
    if tuple(token_weight.shape) != (b, n):
        raise ValueError(f"token selection must be [B, N] = {(b, n)}, got {tuple(token_weight.shape)}")
    return token_weight.to(device=device, dtype=torch.float32)


def pairwise_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Per-image cosine-similarity (Gram) matrix: `[B, N, D]` -> `[B, N, N]` fp32.

    Each token is L2-normalised over its D channels, then `S[b, i, j] = <t_bi, t_bj>`, so S is symmetric,
    its diagonal is 1 (0 for an all-zero token) and its entries lie in [-1, 1].
    """
    _check_tokens("tokens", tokens)
    t = F.normalize(tokens.float(), dim=-1, eps=_EPS)
    return t @ t.transpose(1, 2)


def self_distill_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
                      token_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Negative cosine self-distillation: `-sum_bi w_bi cos(s_bi, t_bi) / sum_bi w_bi` (a scalar).

    Args:
        student_tokens: `[B, N, D]` the student's final patch tokens.
        teacher_tokens: `[B, N, D]` the frozen copy's patch tokens at layer k (detached here).
        token_weight: `[B, N]` selection (bool or float weights, see `token_selection`); None = all tokens.
            Normalisation is over the selected tokens of the **whole batch** (each selected token counts
            once, whichever image it is in). No token selected -> 0 (with the student's graph kept).

    Identical tokens give -1, orthogonal ones 0, opposite ones +1.
    """
    _check_tokens("student_tokens", student_tokens)
    _check_tokens("teacher_tokens", teacher_tokens)
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student and teacher tokens differ in shape: {tuple(student_tokens.shape)} vs "
                         f"{tuple(teacher_tokens.shape)} (the self-distillation teacher is a copy of the student)")
    b, n, _ = student_tokens.shape
    cos = F.cosine_similarity(student_tokens.float(), teacher_tokens.detach().float(), dim=-1, eps=_EPS)
    w = _weights(token_weight, b, n, cos.device)
    return -(cos * w).sum() / w.sum().clamp_min(1.0)


def standardise_by_teacher(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both token sets in the teacher's per-channel standard coordinates: `(x - mu) / sigma`, mu and sigma the
    teacher batch's per-channel mean and std over all its tokens (detached, no state).

    Why: a ViT's residual stream carries a large component shared by every token (measured on the tiny
    preset's layer 3: 72% of the token energy), so a plain cosine is near 1 while the token-specific structure
    a dense probe reads is still far off (cosine 0.99 raw, 0.82 in standard coordinates). Distilling in the
    teacher's standardised space weighs every channel's variation alike, as feature distillation does with
    whitened teacher features (Wei et al. 2022, "FD"); our choice, off by default.
    """
    flat = teacher_tokens.detach().float().flatten(0, 1)
    mu, sigma = flat.mean(0), flat.std(0).clamp_min(_EPS)
    return (student_tokens.float() - mu) / sigma, (teacher_tokens.detach().float() - mu) / sigma


def _as_tokens(target: torch.Tensor, n: int) -> torch.Tensor:
    """`[B, N, C]` as is; `[B, C, h, w]` (h * w = N) flattened row-major to `[B, N, C]`."""
    if target.ndim == 4:
        bt, c, h, w = target.shape
        if h * w != n:
            raise ValueError(f"target grid {h}x{w} does not match the student's {n} tokens; resize the "
                             "teacher features to the student's token grid first")
        return target.flatten(2).transpose(1, 2)
    _check_tokens("target_features", target)
    return target


def centre_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Each image's tokens minus that image's mean token (over all its N tokens): `[B, N, D]` -> `[B, N, D]` fp32.

    Why (our choice, `spatial.centre_tokens`): a ViT's tokens share a large common component (72% of the token
    energy at the tiny preset's layer 3) and the oracle's logits share the sign pattern of the region under each
    prompt, so raw cosine Gram matrices are dominated by what every token of an image has in common; centred,
    the Gram compares what distinguishes the tokens (the Gram of centred features is a covariance structure)."""
    _check_tokens("tokens", tokens)
    t = tokens.float()
    return t - t.mean(dim=1, keepdim=True)


def gram_mse_loss(student_tokens: torch.Tensor, target_features: torch.Tensor, remove_negative: bool = False,
                  tokens: Optional[torch.Tensor] = None, centre: bool = False) -> torch.Tensor:
    """MSE between the student's and the target's per-image token cosine-similarity matrices (a scalar).

    `L = mean_b [ sum_ij m_bi m_bj (S_bij - T_bij)^2 / (sum_i m_bi)^2 ]`, where S = pairwise_similarity of
    the student tokens, T = that of the target features and m the token selection; the diagonal is
    included (it is 1 - 1 = 0 for non-zero tokens, as in DINOv3's Gram loss) and the mean over b runs over
    images with at least one selected token.

    Args:
        student_tokens: `[B, N, D]` the student's patch tokens.
        target_features: `[B, N, C]` (or `[B, C, h, w]` with h * w = N) teacher features on the same token
            grid, any channel count C (the 1024 SAM mask logits, or their cached random projection);
            detached here. Only their cosine similarities matter, so any per-token positive scale is free.
        remove_negative: clip both matrices at 0 before the MSE (negative similarities then carry no
            signal; DINOv3's `remove_neg`). Off by default (our choice).
        tokens: `[B, N]` selection (see `token_selection`): only pairs of selected tokens count.
            None = all tokens.
        centre: subtract each image's mean token from the student tokens and from the target features before
            the cosine Gram (`centre_tokens`; the mean over all N tokens, whatever the selection). Off by default.
    """
    _check_tokens("student_tokens", student_tokens)
    b, n, _ = student_tokens.shape
    target = _as_tokens(target_features.detach(), n)
    if target.shape[:2] != (b, n):
        raise ValueError(f"target_features cover {tuple(target.shape[:2])} (B, N), the student {(b, n)}")
    if centre:
        student_tokens, target = centre_tokens(student_tokens), centre_tokens(target)
    s, t = pairwise_similarity(student_tokens), pairwise_similarity(target)
    if remove_negative:
        s, t = s.clamp_min(0.0), t.clamp_min(0.0)
    m = _weights(tokens, b, n, s.device)
    pair = m[:, :, None] * m[:, None, :]
    per_image = ((s - t) ** 2 * pair).sum((1, 2)) / pair.sum((1, 2)).clamp_min(1.0)
    used = (m.sum(1) > 0).float()
    return (per_image * used).sum() / used.sum().clamp_min(1.0)
