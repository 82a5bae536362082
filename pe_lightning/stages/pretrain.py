"""Stage 1: PE's robust CLIP pretraining (PE_REFERENCE.md s.6).

loss = CLIP(image, text) + mask_reg.weight * MaskFeat(masked copies -> unmasked tokens), on progressive
resolution phases; LAMB, RoPE, attention pooling and the augmentations are recipe keys (recipes/pretrain.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from pe_lightning.config import RecipeError
from pe_lightning.data.transforms import resize_to
from pe_lightning.exports import Export
from pe_lightning.stages.base import Headline, PEStage
from pe_lightning.stages.losses import clamp_logit_scale, clip_loss, mask_feature_loss
from pe_lightning.stages.phases import Phase


@dataclass
class MaskRegArgs:
    """MaskFeat-style mask regularization (PE_REFERENCE.md s.6)."""

    enabled: bool = True
    batch_fraction: float = 0.0625  # 1/16 of the batch gets a masked copy
    mask_ratio: float = 0.75  # of its patches replaced by the mask token
    weight: float = 1.0  # not published: our choice
    # Not published: which token outputs are pulled (our choice, measured in README's ablation section):
    #   all    - every token of the masked copy, class token included (pulls the whole masked view to the clean one)
    #   masked - the masked positions only (MaskFeat's own form: predict what is hidden from its context)
    # recipes/pretrain.yaml ships `masked`; the schema keeps `all`, the form runs made before this key trained with,
    # so that they still resume (a key a saved recipe lacks counts at its schema default).
    tokens: str = "all"


MASK_REG_TOKENS = ("all", "masked")


def check_mask_reg(args: MaskRegArgs, section: str) -> None:
    """Called by each stage with a `mask_reg` section before it builds anything (as its other choices are)."""
    if args.tokens not in MASK_REG_TOKENS:
        raise RecipeError(f"{section}.mask_reg.tokens must be one of {MASK_REG_TOKENS}, got {args.tokens!r}")


def mask_reg_loss(args: MaskRegArgs, masked_tokens: torch.Tensor, clean_tokens: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """The MaskFeat term of `args.tokens`' form: masked copies' tokens pulled to the clean ones (which
    `mask_feature_loss` detaches)."""
    return mask_feature_loss(masked_tokens, clean_tokens, mask if args.tokens == "masked" else None)


@dataclass
class PretrainArgs:
    mask_reg: MaskRegArgs = field(default_factory=MaskRegArgs)
    max_logit_scale: float = 100.0  # CLIP's clamp of the temperature


def pretrain_flops_per_sample(cfg, resolution: int) -> float:
    """Training FLOPs of one sample: both towers, plus the vision pass of its share of masked copies."""
    from pe_lightning.perf import tower_training_flops

    m = cfg.model
    towers = tower_training_flops(m.preset, resolution, dict(m.vision), dict(m.text))
    mask = cfg.pretrain.mask_reg
    return towers["text"] + towers["vision"] * (1.0 + (mask.batch_fraction if mask.enabled else 0.0))


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device) -> torch.Tensor:
    """A boolean [batch, num_patches] mask with exactly round(ratio * num_patches) True per row.

    A fixed count per row (argsort of noise) keeps shapes static, so a compiled model does not recompile.
    """
    num_masked = int(round(ratio * num_patches))
    ranks = torch.rand(batch, num_patches, device=device).argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


class PretrainStage(PEStage):
    """CLIP softmax contrastive loss + MaskFeat-style mask regularization, on progressive phases."""

    name = "pretrain"
    Args = PretrainArgs
    headline_metrics = ("zeroshot_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1", "retrieval_t2i_r1")
    headline = Headline("zero-shot top-1", "zeroshot_top1")

    def __init__(self, cfg, parents=None, fresh: bool = True):
        check_mask_reg(cfg.pretrain.mask_reg if "pretrain" in cfg else MaskRegArgs(), "pretrain")
        super().__init__(cfg, parents, fresh)

    def build_model(self, init: Optional[Export]):
        model = super().build_model(init)
        if self.args.mask_reg.enabled and getattr(model.visual, "mask_token", None) is None:
            model.visual.add_mask_token()  # learned; left out of Meta-layout exports
        return model

    def flops_per_sample(self, resolution: int) -> float:
        return pretrain_flops_per_sample(self.cfg, resolution)

    def loss(self, batch: dict, phase: Phase) -> torch.Tensor:
        images = resize_to(batch["image"], phase.resolution)
        clamp_logit_scale(self.model.logit_scale, self.args.max_logit_scale)
        tokens, masked_tokens, mask = self.encode_tokens(images)
        image_features = self.model.visual.forward_head(tokens)
        text_features = self.model.encode_text(batch["text"])
        loss_clip = clip_loss(image_features, text_features, self.model.logit_scale)
        loss = loss_clip
        if masked_tokens is not None:
            # MaskFeat-style: the masked copies' token outputs (mask_reg.tokens) pulled to the unmasked ones.
            loss_mask = mask_reg_loss(self.args.mask_reg, masked_tokens, tokens[: masked_tokens.shape[0]], mask)
            loss = loss + self.args.mask_reg.weight * loss_mask
            self.log("train/loss_mask", loss_mask)

        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss_clip", loss_clip)
        self.log("train/temperature", 1.0 / self.model.logit_scale.detach().exp())
        self.log_progress(phase)
        return loss

    def encode_tokens(self, images: torch.Tensor):
        """Token outputs of the batch and, with mask regularization, of masked copies of its first
        `batch_fraction` images and their patch mask (else None, None). Both go through one vision forward
        ([B + B/16] rows; the unmasked rows get an all-False mask): one larger pass keeps the GPU busier than
        two, and shapes stay fixed."""
        cfg = self.args.mask_reg
        if not cfg.enabled:
            return self.model.visual.forward_features(images), None, None
        batch = images.shape[0]
        count = max(1, int(round(batch * cfg.batch_fraction)))
        grid = images.shape[-1] // self.model.visual.patch_size
        mask = random_patch_mask(count, grid * grid, cfg.mask_ratio, images.device)
        full_mask = torch.cat([mask.new_zeros(batch, grid * grid), mask])
        all_tokens = self.model.visual.forward_features(torch.cat([images, images[:count]]), mask=full_mask)
        return all_tokens[:batch], all_tokens[batch:], mask
