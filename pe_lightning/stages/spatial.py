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

Keys of #29 (defaults keep the stage as it was): `centre_tokens` (the Gram on each image's centred tokens);
`oracle.kind=graded` (teachers/oracle.py: graded, local logits whose target Gram has a higher effective rank);
`teacher_layer=auto` (the argmax of the teacher parent's dense-probe curve at the stage's resolution on
`dense_set`, measured when the teacher is built, recorded in metrics.json); `mask_token=parent` (the init
export's learned mask token, from its side file `model.mask_token.pt`, models/checkpoint.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

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
ORACLE_KINDS = ("binary", "graded")
MASK_TOKEN_STARTS = ("fresh", "parent")
PAPER_LAYER, PAPER_DEPTH = 41, 50  # PE-Spatial-G self-distills from layer 41 of PE-Core-G's 50
AUTO_PROBE_ITER = 50  # L-BFGS iterations of teacher_layer=auto's dense probes (the dense_eval callback's default)

log = logging.getLogger("pe_lightning")


@dataclass
class OracleArgs:
    """The `oracle` mask-logit teacher's keys (`spatial.oracle:`; teachers/oracle.py). Our choices."""

    kind: str = "binary"  # binary: +-m over the whole region under the point (all background one region) |
    #                       graded: m * clip(signed distance to the mask boundary / (clip * side)), and a
    #                       background point answers only the background within `radius` of it
    clip: float = 0.1  # graded: the distance (fraction of the image side) at which a logit saturates at +-m
    radius: float = 0.25  # graded: a background point's region: the background within this distance (fraction
    #                       of the image side) of the point, as SAM answers a click on "stuff" locally
    magnitude: float = 10.0  # m (cosine similarities do not depend on it)


@dataclass
class SpatialArgs:
    """The spatial stage's keys (`spatial:`). Unpublished values are our choice."""

    teacher: Optional[str] = None  # weights of the self-distillation teacher, instead of the pipeline's parent
    teacher_layer: Any = 0  # k: the teacher's layer (1-based); 0 = round(41/50 * depth) (our scaling); auto = the
    #                         argmax of the teacher parent's dense-probe curve at the stage's resolution on
    #                         `dense_set` (the paper's rule: layer 41 is about G's best dense layer)
    dense_set: str = "single"  # the dense probe set of `teacher_layer: auto` and of the dense_eval callback:
    #                            single | multi | a folder (eval/probe_run.dense_set_dir)
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
    centre_tokens: bool = False  # subtract each image's mean token (student and target) before the Gram (ours)
    mask_ratio: float = 0.75  # of the student's patches replaced by the mask token (secondary sources)
    mask_token: str = "fresh"  # the student's mask token at a fresh start: fresh (N(0, 0.02)) | parent (the init
    #                            export's, from its side file model.mask_token.pt: models/checkpoint.py)
    drop_path: float = 0.1  # DropPath rate in every block (our choice)
    layer_scale: Optional[float] = None  # LayerScale init; None = the PE-Spatial preset of the size; 0 = off
    mask_teacher: str = "oracle"  # oracle (exact shapes-world masks) | sam2 (cache built by `pe-lightning teacher`)
    mask_teacher_grid: int = 32  # n: n x n point prompts (SAM 2.1's 32 x 32)
    oracle: OracleArgs = field(default_factory=OracleArgs)
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
        if a.mask_token not in MASK_TOKEN_STARTS:
            raise RecipeError(f"spatial.mask_token={a.mask_token!r}: choose one of {list(MASK_TOKEN_STARTS)}")
        o = a.oracle
        if o.kind not in ORACLE_KINDS:
            raise RecipeError(f"spatial.oracle.kind={o.kind!r}: choose one of {list(ORACLE_KINDS)}")
        if not (o.clip > 0 and o.radius > 0 and o.magnitude > 0):
            raise RecipeError(f"spatial.oracle: clip, radius and magnitude must be > 0, got {o.clip}, {o.radius}, "
                              f"{o.magnitude}")
        k = a.teacher_layer
        if not (k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 0)):
            raise RecipeError(f"spatial.teacher_layer={k!r}: a layer 1..depth, 0 (round(41/50 * depth)) or auto "
                              "(the argmax of the parent's dense-probe curve)")

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
            model.visual.add_mask_token()  # learned; exported to the side file model.mask_token.pt
            if a.mask_token == "parent" and init is not None:
                self._load_parent_mask_token(model.visual, init)
        return model

    @staticmethod
    def _load_parent_mask_token(visual, init: Export) -> None:
        from pe_lightning.models.checkpoint import mask_token_path, read_mask_token

        token = read_mask_token(init.weights)
        if token is None:
            raise RecipeError(f"spatial.mask_token=parent: {init.weights} has no mask-token side file "
                              f"({mask_token_path(init.weights).name}; exports write it since #29, and a stage "
                              "resumed after its start does not carry its parent's); re-export the parent or set "
                              "spatial.mask_token=fresh")
        if token.shape != visual.mask_token.shape:
            raise RecipeError(f"spatial.mask_token=parent: {mask_token_path(init.weights)} holds a "
                              f"{tuple(token.shape)} token, the student's is {tuple(visual.mask_token.shape)}")
        with torch.no_grad():
            visual.mask_token.copy_(token.to(visual.mask_token.dtype))

    # ----- the self-distillation teacher -----
    @property
    def teacher_layer(self) -> int:
        """k: an explicit layer, 0 (the paper's ratio) or, with `auto`, the layer chosen by build_teacher."""
        depth = self.model.visual.layers
        k = self.args.teacher_layer
        if k == "auto":
            if getattr(self, "_auto_layer", None) is None:
                raise RecipeError("spatial.teacher_layer=auto is chosen from the teacher parent's dense curve when "
                                  "the teacher is built")
            return self._auto_layer
        k = int(k) or default_teacher_layer(depth)
        if not 1 <= k <= depth:
            raise RecipeError(f"spatial.teacher_layer={k}: must be in 1..{depth} (the student's depth), or 0 for "
                              f"round(41/50 * depth) = {default_teacher_layer(depth)}, or auto")
        return k

    def dense_set_dir(self) -> Path:
        from pe_lightning.eval.probe_run import dense_set_dir

        return dense_set_dir(self.cfg.data.root, self.args.dense_set)

    def choose_teacher_layer(self, visual) -> int:
        """`teacher_layer: auto`: the argmax of `visual`'s dense-probe curve (callbacks/dense_eval.dense_curve,
        the end-of-stage probe's protocol) at the stage's resolution on `dense_set`, ties to the earlier layer.
        Recorded in metrics (teacher_layer, teacher_layer_curve) and kept for the end-of-stage evaluation of the
        same parent, which then needs no second pass."""
        import time

        from pe_lightning.eval.dense_curve import dense_curve

        t0 = time.monotonic()
        schedule = getattr(self, "schedule", None) or self.build_schedule()  # the teacher is built before it
        res = next(iter(schedule)).resolution
        set_dir = self.dense_set_dir()
        layers = list(range(1, visual.layers + 1))
        curve = dense_curve(visual, set_dir, layers, res, 128, torch.device("cpu"), AUTO_PROBE_ITER)
        best = max(curve, key=lambda k: (curve[k]["miou"], -k))
        self.parent_curve_memo = {"key": (str(set_dir), res, AUTO_PROBE_ITER, str(self.parents["teacher"].weights)),
                                  "curve": curve}
        self.metrics.update({"teacher_layer_rule": "auto", "teacher_layer_set": str(set_dir),
                             "teacher_layer_curve": [{"layer": k, "score": curve[k]["miou"]} for k in layers]})
        log.info("spatial.teacher_layer=auto: layer %d (dense mIoU %s at %d px on %s, %.1fs)", best,
                 " ".join(f"{curve[k]['miou']:.3f}" for k in layers), res, set_dir, time.monotonic() - t0)
        return int(best)

    def build_teacher(self, parent: Export) -> nn.Module:
        """The parent's vision tower cut after layer k (its blocks past k and its head dropped): a frozen
        network whose `forward_features` are the layer-k tokens (raw residual stream, no ln_post)."""
        m = self.cfg.model
        visual = parent.build_model(m.preset, dict(m.vision), dict(m.text)).visual
        if visual.layers != self.model.visual.layers:
            raise RecipeError(f"the teacher {parent.weights} has {visual.layers} blocks, the student "
                              f"{self.model.visual.layers}: the self-distillation teacher is a copy of the student")
        if self.args.teacher_layer == "auto":
            self._auto_layer = self.choose_teacher_layer(visual.eval())
        k = self.teacher_layer
        self.metrics["teacher_layer"] = int(k)
        return visual.truncate(k)

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
        return default_cache_dir(self.cfg.data, a.mask_teacher, a.mask_teacher_grid, self.token_grid, a.cache_dim,
                                 oracle=self.oracle_args())

    def oracle_args(self) -> Optional[dict]:
        """The oracle teacher's extra arguments (kind, clip, radius) when not the binary default; None else."""
        o = self.args.oracle
        if self.args.mask_teacher != "oracle" or o.kind == "binary":
            return None
        return {"kind": o.kind, "clip": float(o.clip), "radius": float(o.radius)}

    def datamodule(self):
        from pe_lightning.data.dense import DenseDataModule

        a = self.args
        return DenseDataModule(self.cfg.data, cache_dir=self.cache_dir(), tokens=self.token_grid,
                               mask_ratio=a.mask_ratio, seed=self.cfg.seed, teacher=a.mask_teacher,
                               grid=a.mask_teacher_grid, dim=a.cache_dim, build=a.build_cache, schedule=self.schedule,
                               magnitude=float(a.oracle.magnitude), oracle=self.oracle_args())

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
        loss_sam = gram_mse_loss(patches, batch["target"], remove_negative=a.remove_negative, tokens=sam_sel,
                                 centre=a.centre_tokens)
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
