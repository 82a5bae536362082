"""Stage 2: image + video contrastive finetuning (PE_REFERENCE.md s.6-7, STAGE_ANCHORS.md s.1).

Every step holds a batch of clips and a batch of images, both at the final resolution (data.image_size):

    clip embedding  = normalise( mean over the N frames of the un-normalised frame embeddings )   (Meta's
                      CLIP.encode_video(normalize=False), then normalised: the pooling PE evaluates with)
    L_video         = CLIP(clip embeddings, their captions)
    L_image         = CLIP(image embeddings, their captions)         (the paper's images beside its videos)
    loss            = video_weight * L_video + image_weight * L_image [+ mask_reg.weight * MaskFeat(images)]

Both CLIP losses share the model's temperature and contrast over the global batch under DDP
(stages/losses.py clip_loss). Published: 8 uniformly sampled frames, the frame mean, images next to videos at
the final resolution. Everything else is a recipe key marked "our choice" (VideoArgs): the two batch sizes, the
two weights, whether the text tower and the temperature train, whether MaskFeat stays on (images only), an
optional random patch drop on the video frames, and an optional WiSE-FT blend with the parent at the end
(video.parent_blend).

Counting: `samples_seen` (hence train.total_samples, the lr schedule and the throughput) counts clips +
images: a step of 32 clips and 32 images is 64 samples (the contract's sum over a nested batch; our choice).
A clip costs N frames of vision compute, so `flops_per_sample` is the per-sample mean over the step's mix.

Batch sizes are global (summed over ranks) and each splits over the ranks as pretrain's does (whole data
chunks per rank). The stage trains at one resolution: `train.phases` must be empty, and `train.batch_size`
is not read (the step's size is video.clip_batch_size + video.image_batch_size).

What the frame mean cannot see (eval/video.py): it is order-free, so a clip and the same clip reversed embed
alike; "moving left" and "moving right" differ only through where the object starts and ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pe_lightning.config import RecipeError
from pe_lightning.data.transforms import derive_seed, resize_to
from pe_lightning.exports import Export
from pe_lightning.stages.base import Headline, PEStage
from pe_lightning.stages.losses import clamp_logit_scale, clip_loss
from pe_lightning.stages.phases import Phase, PhaseSchedule
from pe_lightning.stages.pretrain import MaskRegArgs, check_mask_reg, mask_reg_loss, random_patch_mask

_VIDEO_SEED_TAG = 0x51DE0  # the video stream's seed: independent of the image stream's draws


@dataclass
class VideoArgs:
    """The video stage's keys (`video:` in a recipe). None of them is published: all are our choice."""

    clip_batch_size: int = 32  # global clips per step (each clip is data.num_frames frames)
    image_batch_size: int = 32  # global images per step
    video_weight: float = 1.0  # of L_video
    image_weight: float = 1.0  # of L_image
    train_text: bool = True  # false: the text tower is frozen (as ViCLIP); it still encodes the captions
    train_logit_scale: bool = True  # false: the temperature stays at the parent's value
    max_logit_scale: float = 100.0  # CLIP's clamp of the temperature
    mask_reg: MaskRegArgs = field(default_factory=lambda: MaskRegArgs(enabled=False))  # MaskFeat on the images
    frame_mask_ratio: float = 0.0  # FLIP/ViCLIP-style: this fraction of every frame's patches replaced by the
    #                                mask token (0 = off). The tower has no token drop, so this regularises
    #                                like FLIP but does not cut the 8x frame compute.
    parent_blend: float = 0.0  # WiSE-FT (Wortsman et al. 2022): the final weights are (1 - parent_blend) x
    #                            finetuned + parent_blend x the init parent's, blended once when training ends,
    #                            before the evals and the export (0 = off). Trades a little of the video gain
    #                            for less forgetting of images.


class VideoStage(PEStage):
    """Image + video CLIP finetuning: frame-mean clip embeddings and image embeddings, each against its captions."""

    name = "video"
    Args = VideoArgs
    roles = ("init",)
    headline_metrics = ("video_t2v_r1", "video_v2t_r1", "video_zeroshot_top1", "video_motion_top1",
                        "video_axis_top1", "zeroshot_top1")
    headline = Headline("video t2v R@1", "video_t2v_r1", "parent_video_t2v_r1", "the parent")

    def __init__(self, cfg, parents=None, fresh: bool = True):
        blend = float(cfg.video.parent_blend) if "video" in cfg else 0.0
        if not 0.0 <= blend < 1.0:  # checked before training, not when the blend runs at its end
            raise RecipeError(f"video.parent_blend={blend}: give a fraction in [0, 1) (0 = no blend)")
        check_mask_reg(cfg.video.mask_reg if "video" in cfg else VideoArgs().mask_reg, "video")
        super().__init__(cfg, parents, fresh)

    # ----- the model -----
    def build_model(self, init: Optional[Export]) -> nn.Module:
        """The init parent's network as it was trained (its export's model.json: a patch stem, another width),
        not the recipe's preset; the preset only for a bare weights file (init= a released Meta .pt)."""
        from pe_lightning.models import PECLIP, load_checkpoint

        structure, m = self.init_structure(init), self.cfg.model
        for tower, keys in ((structure.vision, m.vision), (structure.text, m.text)):  # a memory knob, not a weight
            if tower is not None:
                tower.grad_checkpointing = bool(keys.get("grad_checkpointing", False))
        model = PECLIP(structure)
        if init is not None:
            load_checkpoint(model, init.weights)
        if self.uses_mask_token and getattr(model.visual, "mask_token", None) is None:
            model.visual.add_mask_token()  # learned; left out of Meta-layout exports
        if not self.args.train_text:
            for name, p in model.named_parameters():
                if not name.startswith("visual.") and name != "logit_scale":
                    p.requires_grad_(False)
        if not self.args.train_logit_scale:
            model.logit_scale.requires_grad_(False)
        return model

    @property
    def uses_mask_token(self) -> bool:
        return bool(self.args.mask_reg.enabled or self.args.frame_mask_ratio > 0)

    # ----- data and schedule -----
    @property
    def num_frames(self) -> int:
        return int(self.cfg.data.num_frames)

    def build_schedule(self, world_size: int = 1) -> PhaseSchedule:
        """One phase at data.image_size whose batch is clips + images; each part is checked on its own."""
        if len(self.cfg.train.phases):
            raise RecipeError("train.phases: the video stage trains at one resolution, data.image_size (images at "
                              "the final resolution): set train.phases=[] and size the step with "
                              "video.clip_batch_size and video.image_batch_size")
        clips, images = self.part_schedules(world_size)
        total = clips[0].batch_size + images[0].batch_size
        return PhaseSchedule([Phase(None, self.cfg.data.image_size, total)], self.cfg.train.total_samples,
                             patch_size=self.patch_size, chunk_size=self.cfg.data.chunk_size, world_size=world_size)

    def part_schedules(self, world_size: int = 1) -> tuple[PhaseSchedule, PhaseSchedule]:
        """The clip and the image stream's batch sizes as schedules (the data modules follow them per rank)."""
        out = []
        for key in ("clip_batch_size", "image_batch_size"):
            try:
                out.append(PhaseSchedule([Phase(None, self.cfg.data.image_size, int(self.args[key]))],
                                         self.cfg.train.total_samples, patch_size=self.patch_size,
                                         chunk_size=self.cfg.data.chunk_size, world_size=world_size))
            except ValueError as err:
                raise RecipeError(f"video.{key}: {err}") from None
        return out[0], out[1]

    def datamodule(self):
        """{"video": {"video" [B,N,3,S,S], "text"}, "image": {"image" [B,3,S,S], "text"}} every step."""
        from pe_lightning.data.datamodule import ImageTextDataModule, MultiDataModule, VideoTextDataModule

        clips, images = self.part_schedules()
        tokenize, seed = self.tokenizer(), self.cfg.seed
        return MultiDataModule(
            video=VideoTextDataModule(self.cfg.data, tokenize=tokenize, seed=derive_seed(seed, _VIDEO_SEED_TAG),
                                      schedule=clips),
            image=ImageTextDataModule(self.cfg.data, tokenize=tokenize, seed=seed, schedule=images))

    # ----- the loss -----
    def loss(self, batch: dict, phase: Phase) -> torch.Tensor:
        clamp_logit_scale(self.model.logit_scale, self.args.max_logit_scale)
        frames = resize_to(batch["video"]["video"], phase.resolution)
        images = resize_to(batch["image"]["image"], phase.resolution)
        clip_features, image_features, masked = self.encode_visual(frames, images)
        clip_text, image_text = self.encode_captions(batch["video"]["text"], batch["image"]["text"])
        loss_video = clip_loss(clip_features, clip_text, self.model.logit_scale)
        loss_image = clip_loss(image_features, image_text, self.model.logit_scale)
        loss = self.args.video_weight * loss_video + self.args.image_weight * loss_image
        if masked is not None:
            loss_mask = mask_reg_loss(self.args.mask_reg, *masked)
            loss = loss + self.args.mask_reg.weight * loss_mask
            self.log("train/loss_mask", loss_mask)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss_video", loss_video)
        self.log("train/loss_image", loss_image)
        self.log("train/temperature", 1.0 / self.model.logit_scale.detach().exp())
        self.log_progress(phase)
        return loss

    def encode_visual(self, frames: torch.Tensor, images: torch.Tensor):
        """Clip embeddings [Bv, D] (un-normalised mean of the frame embeddings; clip_loss normalises), image
        embeddings [Bi, D], and (masked tokens, their unmasked targets, their patch mask) for MaskFeat or None.

        Frames, images and the MaskFeat copies go through one vision pass ([Bv*N + Bi (+ Bi/16)] rows, one
        mask over all of them, all-False where nothing is masked): one larger pass keeps a GPU busier."""
        b, n = frames.shape[:2]
        rows = torch.cat([frames.flatten(0, 1), images])
        mask = None
        extra = 0
        if self.uses_mask_token:
            grid = images.shape[-1] // self.patch_size
            mask = self.frame_mask(b * n, grid * grid, images.device)
            mask = torch.cat([mask, mask.new_zeros(images.shape[0], grid * grid)])
            if self.args.mask_reg.enabled:
                extra = max(1, int(round(images.shape[0] * self.args.mask_reg.batch_fraction)))
                rows = torch.cat([rows, images[:extra]])
                mask = torch.cat([mask, random_patch_mask(extra, grid * grid, self.args.mask_reg.mask_ratio,
                                                          images.device)])
        tokens = self.model.visual.forward_features(rows, mask=mask)
        frame_tokens, image_tokens = tokens[: b * n], tokens[b * n: rows.shape[0] - extra]
        clip_features = self.model.visual.forward_head(frame_tokens).view(b, n, -1).mean(dim=1)
        image_features = self.model.visual.forward_head(image_tokens)
        masked = (tokens[rows.shape[0] - extra:], image_tokens[:extra], mask[rows.shape[0] - extra:]) if extra else None
        return clip_features, image_features, masked

    def frame_mask(self, rows: int, patches: int, device: torch.device) -> torch.Tensor:
        """[rows, patches] bool: `frame_mask_ratio` of each frame's patches, drawn per frame (all False if 0)."""
        if self.args.frame_mask_ratio <= 0:
            return torch.zeros(rows, patches, dtype=torch.bool, device=device)
        return random_patch_mask(rows, patches, self.args.frame_mask_ratio, device)

    def encode_captions(self, clip_tokens: torch.Tensor, image_tokens: torch.Tensor):
        """Both caption batches through one text pass (no graph when the text tower is frozen)."""
        with torch.set_grad_enabled(self.args.train_text and torch.is_grad_enabled()):
            text = self.model.encode_text(torch.cat([clip_tokens, image_tokens]))
        return text[: clip_tokens.shape[0]], text[clip_tokens.shape[0]:]

    # ----- counting and cost -----
    def flops_per_sample(self, resolution: int) -> float:
        """Training FLOPs per sample (clip or image) at `resolution`, averaged over the step's mix: a clip is N
        frames of vision plus one caption, an image one of each; a frozen text tower costs its forward only."""
        from pe_lightning.perf import tower_training_flops

        m = self.cfg.model
        flops = tower_training_flops(m.preset, resolution, dict(m.vision), dict(m.text))
        text = flops["text"] * (1.0 if self.args.train_text else 1.0 / 3.0)  # forward = 1/3 of fwd + bwd
        clips, images = self.args.clip_batch_size, self.args.image_batch_size
        return (clips * (self.num_frames * flops["vision"] + text) + images * (flops["vision"] + text)) / (
            clips + images)

    # ----- the end -----
    def finish_training(self) -> None:
        """WiSE-FT: move every floating weight of the model `parent_blend` of the way back to the parent's (the
        model's own extras, such as a training-time mask token, stay as trained)."""
        blend = float(self.args.parent_blend)
        if blend == 0.0:
            return
        if "init" not in self.parents:
            raise RecipeError("video.parent_blend needs the init parent's weights, and none is given: pass "
                              "init=PATH (the export the stage started from), or set video.parent_blend=0")
        parent = self.build_teacher(self.parents["init"]).state_dict()
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():  # views of the parameters: blended in place
                if name in parent and tensor.is_floating_point():
                    tensor.lerp_(parent[name].to(tensor), blend)
        self.metrics["parent_blend"] = blend
