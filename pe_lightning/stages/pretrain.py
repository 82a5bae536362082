"""Stage 1: PE's robust CLIP pretraining (PE_REFERENCE.md s.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pe_lightning.stages.base import PEStage
from pe_lightning.stages.phases import Phase
from pe_lightning.stages.losses import clamp_logit_scale, clip_loss, mask_feature_loss


def resize_to(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Progressive resolution happens on the device, so the data stream never restarts for it."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=True)


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device) -> torch.Tensor:
    """A boolean [batch, num_patches] mask with exactly round(ratio * num_patches) True per row.

    A fixed count per row (argsort of noise) keeps shapes static, so a compiled model does not recompile.
    """
    num_masked = int(round(ratio * num_patches))
    ranks = torch.rand(batch, num_patches, device=device).argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


class PretrainStage(PEStage):
    """CLIP softmax contrastive loss + MaskFeat-style mask regularization, on progressive phases."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.mask_reg.enabled and getattr(self.model.visual, "mask_token", None) is None:
            self.model.visual.add_mask_token()  # learned; left out of Meta-layout exports

    def step(self, batch: dict, phase: Phase) -> torch.Tensor:
        images = resize_to(batch["image"], phase.resolution)
        clamp_logit_scale(self.model.logit_scale, self.cfg.train.max_logit_scale)
        tokens, masked_tokens = self.encode_tokens(images)
        image_features = self.model.visual.forward_head(tokens)
        text_features = self.model.encode_text(batch["text"])
        loss_clip = clip_loss(image_features, text_features, self.model.logit_scale)
        loss = loss_clip
        if masked_tokens is not None:
            # MaskFeat-style: the masked copies' token outputs are pulled to the unmasked ones (detached).
            loss_mask = mask_feature_loss(masked_tokens, tokens[: masked_tokens.shape[0]].detach())
            loss = loss + self.cfg.mask_reg.weight * loss_mask
            self.log("train/loss_mask", loss_mask)

        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss_clip", loss_clip)
        self.log("train/temperature", 1.0 / self.model.logit_scale.detach().exp())
        self.log_scalars({"train/lr": self.lr_schedule(self.samples_seen), "train/resolution": phase.resolution,
                          "train/batch_size": phase.batch_size, "train/samples_seen": self.samples_seen})
        return loss

    def encode_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token outputs of the batch and, with mask regularization, of masked copies of its first
        `batch_fraction` images. Both go through one vision forward ([B + B/16] rows; the unmasked rows
        get an all-False mask): one larger pass keeps the GPU busier than two, and shapes stay fixed."""
        cfg = self.cfg.mask_reg
        if not cfg.enabled:
            return self.model.visual.forward_features(images), None
        batch = images.shape[0]
        count = max(1, int(round(batch * cfg.batch_fraction)))
        grid = images.shape[-1] // self.model.visual.patch_size
        mask = random_patch_mask(count, grid * grid, cfg.mask_ratio, images.device)
        full_mask = torch.cat([mask.new_zeros(batch, grid * grid), mask])
        all_tokens = self.model.visual.forward_features(torch.cat([images, images[:count]]), mask=full_mask)
        return all_tokens[:batch], all_tokens[batch:]
