"""Stage 5: spatial alignment, PE-Spatial (PE_REFERENCE.md s.7, STAGE_ANCHORS.md s.4).

    loss = self_distill_weight * self_distill_loss(student final patch tokens, teacher layer-k patch tokens)
         + sam_weight * gram_mse_loss(student final patch tokens, cached SAM 2.1 / oracle mask-logit feature)

- **Student**: the init export's vision tower as a PE-Spatial model: text tower, `ln_post`, `attn_pool` and
  `proj` dropped (PE-Spatial has no head; its output is the token sequence after the last block), every
  other vision parameter trained (stem, embeddings, class token, all blocks). Its input is MaskFeat-masked:
  `mask_ratio` of the patches replaced by a learned mask token (the mask is drawn per sample by the data
  pipeline, data/dense.py). DropPath at `drop_path` in every block; LayerScale only where the PE-Spatial
  model of the preset's size has it (G: 0.1; L/B/S/T and our tiny preset: none), or `layer_scale`.
- **Teacher 1** (self-distillation): a frozen copy of the teacher parent's vision tower cut after layer k
  (`teacher_layer`; the paper's 41 of 50, scaled to the depth: round(41/50 * depth), our choice), fed the
  **unmasked** image (our choice); its layer-k tokens are the raw residual stream (no `ln_post`). The loss
  is the **negative** cosine (Meta confirmed the sign, PE issue #43). With `teacher_resolution` above the
  student's, the teacher sees the image larger (as DINOv3's Gram teacher sees 2x crops) and its finer token map
  is area-pooled onto the student's grid: the student learns to produce, from its own resolution, the detail the
  frozen copy only resolves at the larger one.
- **Teacher 2** (locality): SAM 2.1's 32x32 point-prompt mask logits (or the `oracle` of the shapes world),
  resized to the token grid and randomly projected, read from a teacher cache (teachers/cache.py; the
  default `oracle` cache is built by the stage when missing). The step runs no mask-logit teacher.
- Token policies (`self_distill_tokens`, `sam_tokens`: visible | masked | all) pick which patch tokens carry
  each loss; `class_token` says whether the class token carries the self-distillation term (ignore |
  self_distill); it never enters the Gram term (the SAM feature has no class token).
- One resolution for the whole stage: the cache holds one token grid (resolution / patch).

Not published, so our choices (recipe keys): both weights, k for small depths, the token policies, the class
token, negative clipping (`remove_negative`), DropPath, the teacher's unmasked input, lr and schedule.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from pe_lightning.config import RecipeError
from pe_lightning.data.transforms import resize_to
from pe_lightning.exports import Export, write_model_json
from pe_lightning.stages.base import Headline, PEStage
from pe_lightning.stages.dense_losses import (TOKEN_POLICIES, gram_mse_loss, self_distill_loss, standardise_by_teacher,
                                              token_selection)
from pe_lightning.stages.phases import Phase

CLASS_TOKEN_POLICIES = ("ignore", "self_distill")
DISTILL_SPACES = ("raw", "standardised")
MASK_TEACHERS = ("oracle", "sam2")
PAPER_LAYER, PAPER_DEPTH = 41, 50  # PE-Spatial-G self-distills from layer 41 of PE-Core-G's 50


@dataclass
class SpatialArgs:
    """The spatial stage's keys (`spatial:`). Unpublished values are our choice."""

    teacher: Optional[str] = None  # weights of the self-distillation teacher, instead of the pipeline's parent
    teacher_layer: int = 0  # k: the teacher's layer (1-based); 0 = round(41/50 * depth) (our scaling)
    teacher_resolution: int = 0  # the teacher's input side; 0 = the student's. Larger: its finer token map is
    #                              area-pooled to the student's grid (DINOv3's Gram teacher sees 2x; our choice)
    self_distill_weight: float = 1.0  # our choice
    self_distill_space: str = "raw"  # raw (the paper's cosine) | standardised (in the teacher's per-channel
    #                                  standard coordinates, dense_losses.standardise_by_teacher; our choice)
    sam_weight: float = 1.0  # our choice
    self_distill_tokens: str = "all"  # visible | masked | all (our choice)
    sam_tokens: str = "all"  # visible | masked | all (our choice)
    class_token: str = "ignore"  # ignore | self_distill: the class token also pulled to the teacher's (our choice)
    remove_negative: bool = False  # clip both similarity matrices at 0 (DINOv3's remove_neg; our choice: off)
    mask_ratio: float = 0.75  # of the student's patches replaced by the mask token (secondary sources)
    drop_path: float = 0.1  # DropPath rate in every block (our choice)
    layer_scale: Optional[float] = None  # LayerScale init; None = the PE-Spatial preset of the size; 0 = off
    mask_teacher: str = "oracle"  # oracle (exact shapes-world masks) | sam2 (cache built by `pe-lightning teacher`)
    mask_teacher_grid: int = 32  # n: n x n point prompts (SAM 2.1's 32 x 32)
    cache_dim: int = 128  # the cache's random-projection dim of the n*n logit channels
    cache_dir: Optional[str] = None  # None = <data.root>/teacher_cache/<teacher>-g<n>-t<tokens>-d<dim>
    build_cache: bool = True  # build a missing oracle cache before training (sam2 caches never are)


def default_teacher_layer(depth: int) -> int:
    """The paper's layer 41 of 50 scaled to `depth` blocks: round(41/50 * depth), at least 1 (tiny: 3 of 4)."""
    return max(1, min(depth, int(round(PAPER_LAYER / PAPER_DEPTH * depth))))


def spatial_layer_scale(preset: str) -> Optional[float]:
    """LayerScale of the PE-Spatial model of `preset`'s size (PE-Core-G -> PE-Spatial-G: 0.1; L/B/S/T: none);
    a preset with no PE-Spatial sibling (tiny) keeps its own `ls_init_value`."""
    from pe_lightning.models.presets import PRESETS, get_preset

    parts = preset.split("-")
    if len(parts) >= 3 and parts[0] == "PE" and parts[2]:
        size = parts[2][0]
        sibling = next((n for n in PRESETS if n.startswith(f"PE-Spatial-{size}")), None)
        if sibling is not None:
            return PRESETS[sibling].vision.ls_init_value
    return get_preset(preset).vision.ls_init_value


def spatial_config(parent_cfg):
    """A PE-Spatial CLIPConfig from a parent's: vision only, no ln_post / attn_pool / proj. `truncated_from`
    is set, so loading a PE-Core file drops its head explicitly (checkpoint.py) instead of failing."""
    from pe_lightning.models.presets import CLIPConfig

    v = parent_cfg.vision
    vision = dataclasses.replace(v, pool_type="none", use_ln_post=False, output_dim=None, use_mask_token=False,
                                 grad_checkpointing=False, drop_path=0.0,
                                 truncated_from=v.truncated_from if v.truncated_from is not None else v.layers)
    return CLIPConfig(vision=vision, text=None, name=parent_cfg.name)


class SpatialStage(PEStage):
    """Self-distillation from the frozen copy's layer k + SAM mask-logit Gram MSE, on MaskFeat-masked input."""

    name = "spatial"
    Args = SpatialArgs
    roles = ("init", "teacher")
    headline_metrics = ("dense_miou", "parent_dense_miou", "parent_dense_miou_best", "parent_dense_best_layer",
                        "parent_zeroshot_top1")
    one_resolution_because = "its cached teacher target is on one token grid"
    headline = Headline("dense mIoU", "dense_miou", "parent_dense_miou", "the parent")

    def __init__(self, cfg, parents=None, fresh: bool = True):
        self._check_args(cfg[self.name] if self.name in cfg else SpatialArgs())
        super().__init__(cfg, parents, fresh)
        self._parents_built: dict[str, nn.Module] = {}  # a plain dict: never a submodule (see parent_model)

    @staticmethod
    def _check_args(a) -> None:
        for key in ("self_distill_tokens", "sam_tokens"):
            policy = getattr(a, key)
            if policy not in TOKEN_POLICIES:
                raise RecipeError(f"spatial.{key}={policy!r}: choose one of {list(TOKEN_POLICIES)}")
            if policy == "masked" and not a.mask_ratio > 0:
                raise RecipeError(f"spatial.{key}=masked needs spatial.mask_ratio > 0 (nothing is masked)")
        if a.class_token not in CLASS_TOKEN_POLICIES:
            raise RecipeError(f"spatial.class_token={a.class_token!r}: choose one of {list(CLASS_TOKEN_POLICIES)}")
        if a.self_distill_space not in DISTILL_SPACES:
            raise RecipeError(f"spatial.self_distill_space={a.self_distill_space!r}: choose one of "
                              f"{list(DISTILL_SPACES)}")
        if a.mask_teacher not in MASK_TEACHERS:
            raise RecipeError(f"spatial.mask_teacher={a.mask_teacher!r}: choose one of {list(MASK_TEACHERS)}")
        if not 0.0 <= a.mask_ratio < 1.0:
            raise RecipeError(f"spatial.mask_ratio={a.mask_ratio}: must be in [0, 1)")
        if not 0.0 <= a.drop_path < 1.0:
            raise RecipeError(f"spatial.drop_path={a.drop_path}: must be in [0, 1)")

    # ----- the student -----
    def build_model(self, init: Optional[Export]) -> nn.Module:
        """The PE-Spatial student (module docstring), with the init parent's vision weights on a fresh start."""
        from pe_lightning.models import PECLIP, load_checkpoint

        a = self.args
        model = PECLIP(spatial_config(self.init_structure(init)))
        if init is not None:
            load_checkpoint(model, init.weights)  # drops the text tower and the head, reported in the log
        ls = a.layer_scale if a.layer_scale is not None else spatial_layer_scale(self.cfg.model.preset)
        if ls:
            model.visual.set_layer_scale(float(ls))
        if a.drop_path:
            model.visual.set_drop_path(float(a.drop_path))
        if a.mask_ratio > 0:
            model.visual.add_mask_token()  # learned; left out of the export
        return model

    # ----- the self-distillation teacher -----
    @property
    def teacher_layer(self) -> int:
        depth = self.model.visual.layers
        k = int(self.args.teacher_layer) or default_teacher_layer(depth)
        if not 1 <= k <= depth:
            raise RecipeError(f"spatial.teacher_layer={k}: must be in 1..{depth} (the student's depth), or 0 for "
                              f"round(41/50 * depth) = {default_teacher_layer(depth)}")
        return k

    def build_teacher(self, parent: Export) -> nn.Module:
        """The parent's vision tower cut after layer k (its blocks past k and its head dropped): a frozen
        network whose `forward_features` are the layer-k tokens (raw residual stream, no ln_post)."""
        m = self.cfg.model
        visual = parent.build_model(m.preset, dict(m.vision), dict(m.text)).visual
        if visual.layers != self.model.visual.layers:
            raise RecipeError(f"the teacher {parent.weights} has {visual.layers} blocks, the student "
                              f"{self.model.visual.layers}: the self-distillation teacher is a copy of the student")
        return visual.truncate(self.teacher_layer)

    def parent_model(self) -> Optional[nn.Module]:
        """The whole parent (init, else teacher) with its text tower and head, for the `parent_` figures
        (zero-shot, the per-layer dense curve); built once, after training."""
        for role in ("init", "teacher"):
            if role in self.parents:
                if role not in self._parents_built:
                    m = self.cfg.model
                    model = self.parents[role].build_model(m.preset, dict(m.vision), dict(m.text))
                    self._parents_built[role] = model.to(self.device).eval().requires_grad_(False)
                return self._parents_built[role]
        return None

    # ----- the token grid -----
    @property
    def token_grid(self) -> int:
        """g: the side of the student's token grid at the stage's resolution (the cache's `tokens`)."""
        return next(iter(self.schedule)).resolution // self.patch_size

    def cache_dir(self) -> Path:
        from pe_lightning.data.dense import default_cache_dir

        a = self.args
        if a.cache_dir:
            return Path(a.cache_dir)
        return default_cache_dir(self.cfg.data, a.mask_teacher, a.mask_teacher_grid, self.token_grid, a.cache_dim)

    def datamodule(self):
        from pe_lightning.data.dense import DenseDataModule

        a = self.args
        return DenseDataModule(self.cfg.data, cache_dir=self.cache_dir(), tokens=self.token_grid,
                               mask_ratio=a.mask_ratio, seed=self.cfg.seed, teacher=a.mask_teacher,
                               grid=a.mask_teacher_grid, dim=a.cache_dim, build=a.build_cache, schedule=self.schedule)

    def tokenizer(self):
        return None  # no text

    @property
    def teacher_resolution(self) -> int:
        res = int(self.args.teacher_resolution) or next(iter(self.schedule)).resolution
        if res % self.patch_size:
            raise RecipeError(f"spatial.teacher_resolution={res}: must be a multiple of the patch size "
                              f"{self.patch_size}")
        return res

    def teacher_tokens(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """The teacher's layer-k tokens of `images` at `teacher_resolution`, patch tokens area-pooled to the
        student's `grid` x `grid` when the teacher's grid is finer ([B, prefix + grid^2, W])."""
        tokens = self.teacher.forward_features(resize_to(images, self.teacher_resolution))
        prefix = self.teacher.num_prefix_tokens
        side = self.teacher_resolution // self.patch_size
        if side == grid:
            return tokens
        patches = tokens[:, prefix:].unflatten(1, (side, side)).permute(0, 3, 1, 2)  # [B, W, side, side]
        pooled = torch.nn.functional.adaptive_avg_pool2d(patches, grid).flatten(2).transpose(1, 2)
        return torch.cat([tokens[:, :prefix], pooled], dim=1)

    # ----- the loss -----
    def loss(self, batch: dict, phase: Phase) -> torch.Tensor:
        a = self.args
        images = resize_to(batch["image"], phase.resolution)
        mask = batch["patch_mask"] if a.mask_ratio > 0 else None
        prefix = self.model.visual.num_prefix_tokens
        student = self.model.visual.forward_features(images, mask=mask)  # [B, prefix + N, W]
        with torch.no_grad():
            teacher = self.teacher_tokens(batch["image"], self.token_grid)  # layer k of the unmasked image
        patches = student[:, prefix:]
        shape = tuple(patches.shape[:2])
        distill_sel = token_selection(mask, a.self_distill_tokens, shape).to(patches.device)
        if prefix and a.class_token == "self_distill":
            distill_sel = torch.cat([distill_sel.new_ones(shape[0], prefix), distill_sel], dim=1)
            pair = (student, teacher)
        else:
            pair = (patches, teacher[:, prefix:])
        if a.self_distill_space == "standardised":
            pair = standardise_by_teacher(*pair)
        loss_self = self_distill_loss(*pair, distill_sel)
        sam_sel = token_selection(mask, a.sam_tokens, shape).to(patches.device)
        loss_sam = gram_mse_loss(patches, batch["target"], remove_negative=a.remove_negative, tokens=sam_sel)
        loss = a.self_distill_weight * loss_self + a.sam_weight * loss_sam
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss_self_distill", loss_self)
        self.log("train/loss_sam", loss_sam)
        self.log_progress(phase)
        return loss

    # ----- bookkeeping -----
    def flops_per_sample(self, resolution: int) -> float:
        """Student forward + backward and the teacher's forward through k blocks at its own resolution (the losses
        are O(N^2 D), small)."""
        from torch.utils.flop_counter import FlopCounterMode

        from pe_lightning.models import PECLIP, VisionTransformer
        from pe_lightning.perf import training_flops

        with torch.device("meta"):
            student = PECLIP(self.model.cfg).visual
            teacher = VisionTransformer(self.teacher.cfg) if "teacher" in self._frozen else None
            images = torch.zeros(1, 3, resolution, resolution)
            side = int(self.args.teacher_resolution) or resolution
            teacher_images = torch.zeros(1, 3, side, side)
        flops = training_flops(lambda: student.forward_features(images))
        if teacher is not None:
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                teacher.forward_features(teacher_images)
            flops += float(counter.get_total_flops())
        return flops

    def compile_model(self) -> None:
        super().compile_model()
        if "teacher" in self._frozen:
            self.teacher.compile(dynamic=False)

    def export(self, out_dir: Path) -> None:
        """A PE-Spatial file in Meta's layout: the vision keys under `visual.` (Meta's loader strips the
        prefix), no text tower, no ln_post / attn_pool / proj, LayerScale gammas where the student has them,
        no mask token; model.json records the structure without the training-time DropPath."""
        from pe_lightning.models.checkpoint import export_checkpoint

        export_checkpoint(self.model, out_dir / "model.pt")
        cfg = copy.deepcopy(self.model.cfg)
        cfg.vision.drop_path, cfg.vision.use_mask_token = 0.0, False
        write_model_json(SimpleNamespace(cfg=cfg), out_dir)
