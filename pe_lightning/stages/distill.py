"""Stage 3: CLIP-style distillation of a frozen PE teacher into a smaller student (PE_REFERENCE.md s.7,
STAGE_ANCHORS.md s.2; issue 12).

Within each batch the student's image->text and text->image similarity distributions are trained toward the
teacher's soft targets (stages/distill_losses.py):

    loss = distill_weight * softCE(p_T, q_S) + contrastive_weight * CLIP(student) + feature_weight * MSE

Published: soft targets on the in-batch similarities, no weight decay, a short run. Everything else is a
recipe key marked "our choice" (DistillArgs): the temperature mode (`teacher_scale`: None = each model its
own scale, as open_clip's DistillClipLoss; 100 = MobileCLIP; 50 = TinyCLIP), the three weights, the feature
term and its projection, the resolutions, lr and schedule.

The teacher: the `teacher` parent (recipes/pipeline.yaml: the video export) or `distill.teacher=PATH` (an
export folder, or a released PE-Core file whose structure `distill.teacher_model=PRESET` names). Kept frozen
outside the state dict (base `set_teacher`): never in a checkpoint or the export, never wrapped by DDP,
rebuilt on every start. It runs under no_grad in the training precision (inside the step's autocast), at its
own resolution (`distill.teacher_resolution`, default its native image size; the loader must emit at least
that) and with its own tokenizer (its context length; the loader tokenizes the captions twice when the two
lengths differ). With `distill.cache=DIR` (built by `pe-lightning teacher clip`) the loader replays the
augmentations the cached embeddings were computed on and the step runs no teacher forward; the teacher is
then built only at the end, for its zero-shot figures.

The student is `model:` (the embedded default: `tiny-half`), from scratch or from `init=`. Its export is a
PE-Core file in Meta's layout (the feature term's projector is part of the stage, not of the student).

Gradient accumulation works (open_clip's distillation refuses it): each micro-batch is its own softmax
batch, so with `trainer.accumulate_grad_batches=k` a step's gradient is the mean of k micro-batch
gradients, each with soft targets over its own B samples (not over the k*B of the step).

The scratch baseline (`distill.scratch_baseline`, on in the embedded recipe): a second student of the same
preset, a copy of the distilled student's initial weights, trained in the same steps on the same batches with
the plain CLIP loss of pretraining (clip_loss, temperature clamped at max_logit_scale), by its own optimizer
of the same kind and settings (`distill.scratch_lr` may set its own lr). Its parameters get no gradient from
the distillation loss and vice versa, and it is stepped separately (no shared clipping), so it trains exactly
as it would alone. It is checkpointed with the stage (exact resume) and evaluated at the end
(callbacks/distill_eval.py -> scratch_zeroshot_top1), never exported.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import nn

from pe_lightning.config import RecipeError
from pe_lightning.data.transforms import derive_seed
from pe_lightning.exports import MODEL_JSON, Export
from pe_lightning.models.checkpoint import CheckpointError
from pe_lightning.stages.base import Headline, PEStage
from pe_lightning.stages.distill_losses import ClipDistillLoss
from pe_lightning.stages.losses import clamp_logit_scale, clip_loss
from pe_lightning.stages.optim import build_optimizer, param_groups, set_lr
from pe_lightning.stages.phases import Phase

_PROJECTION_SEED_TAG = 0xD157  # the feature projection's seed, independent of the teacher's construction


@dataclass
class DistillArgs:
    """The distill stage's keys (`distill:` in a recipe)."""

    teacher: Optional[str] = None  # teacher weights (export folder or PE-Core file) instead of the teacher parent
    teacher_model: Optional[str] = None  # the preset of a bare teacher file (an export records its own structure)
    teacher_resolution: Optional[int] = None  # our choice; None = the teacher's native image size
    teacher_scale: Optional[float] = None  # our choice: None = the teacher's own learned scale; a fixed scale
    #                                        (not a log): 100 = MobileCLIP, 50 = TinyCLIP
    distill_weight: float = 1.0  # our choice: the soft-target term
    contrastive_weight: float = 1.0  # our choice: the student's own CLIP loss (0 = pure distillation, TinyCLIP)
    feature_weight: float = 0.0  # our choice: MSE of normalised image embeddings (CLIP-KD used 2000)
    feature_projection: bool = False  # learned student->teacher width map for the feature term (not exported)
    max_logit_scale: float = 100.0  # CLIP's clamp of the student's temperature
    cache: Optional[str] = None  # a teacher-embedding cache folder (`pe-lightning teacher clip`): no teacher forward
    scratch_baseline: bool = False  # also train the same student with the plain CLIP loss, side by side
    scratch_lr: Optional[float] = None  # the baseline's peak lr (None = optim.lr)


class DistillTeacherError(CheckpointError):
    """A teacher that cannot be used: unreadable weights, an unnamed or wrong structure, no text tower."""


class CachedTeacher(nn.Module):
    """The teacher in cached mode: only its log logit scale and width, from the cache's manifest."""

    def __init__(self, logit_scale: Optional[float], embed_dim: int, image_size: int):
        super().__init__()
        self.register_buffer("logit_scale", torch.tensor(math.nan if logit_scale is None else float(logit_scale)))
        self.embed_dim, self.image_size = int(embed_dim), int(image_size)
        self.vision_only = True  # not a model to evaluate: the real teacher is built for that


class DistillStage(PEStage):
    """Soft-target CLIP distillation from a frozen teacher (online or cached), with an optional scratch baseline."""

    name = "distill"
    Args = DistillArgs
    roles = ("init", "teacher")
    headline_metrics = ("zeroshot_top1", "scratch_zeroshot_top1", "teacher_zeroshot_top1")
    headline = Headline("zero-shot top-1", "zeroshot_top1", "scratch_zeroshot_top1", "scratch")

    def __init__(self, cfg, parents=None, fresh: bool = True):
        self.scratch: Optional[nn.Module] = None
        self._scratch_optimizer: Optional[torch.optim.Optimizer] = None
        self._scratch_state: Optional[dict] = None
        self._teacher_flops: dict[int, float] = {}
        super().__init__(cfg, parents, fresh)
        self.distill_loss: Optional[ClipDistillLoss] = None
        if "teacher" in self._frozen:
            self.teacher_resolution = self._check_teacher_resolution()
            # the feature projection's initial weights from the recipe's seed alone: building an online teacher
            # draws random numbers a cached one does not, and both ways must start from the same weights
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(int(cfg.seed), _PROJECTION_SEED_TAG))
                self.distill_loss = ClipDistillLoss(
                    self.student_dim, self.teacher_dim, teacher_scale=self.args.teacher_scale,
                    distill_weight=self.args.distill_weight, contrastive_weight=self.args.contrastive_weight,
                    feature_weight=self.args.feature_weight, feature_projection=self.args.feature_projection)
            if self.args.teacher_scale is None and not torch.isfinite(self.teacher.logit_scale).all():
                raise RecipeError(f"distill.cache={self.args.cache} records no teacher logit scale: set a fixed "
                                  "distill.teacher_scale (e.g. 100)")

    # ----- the student and its baseline -----
    def build_model(self, init: Optional[Export]) -> nn.Module:
        model = super().build_model(init)
        if model.vision_only:
            raise RecipeError(f"model={self.cfg.model.preset} is vision-only: the distilled student must be a "
                              "PE-Core (CLIP) preset with a text tower, e.g. model=tiny-half")
        if self.args.scratch_baseline:
            # the same initial weights (init's or this seed's random ones); on resume both come from the checkpoint
            self.scratch = copy.deepcopy(model)
        return model

    def scratch_model(self) -> Optional[nn.Module]:
        """The plain-CLIP baseline student (None without `distill.scratch_baseline`), for the eval callback."""
        return self.scratch

    def compile_model(self) -> None:
        super().compile_model()
        if self.scratch is not None:
            self.scratch.visual.compile(dynamic=False)
            self.scratch.transformer.compile(dynamic=False)

    @property
    def student_dim(self) -> int:
        return int(self.model.visual.cfg.output_dim)

    # ----- the teacher -----
    def build_teacher(self, parent: Export) -> nn.Module:
        if self.args.cache:
            return self._cached_teacher(parent)
        return self._load_teacher(parent)

    def _load_teacher(self, parent: Export) -> nn.Module:
        has_structure = parent.folder is not None and (parent.folder / MODEL_JSON).is_file()
        preset = self.args.teacher_model
        if not has_structure and preset is None:
            raise DistillTeacherError(
                f"distill teacher {parent.weights} is a bare weights file: name its structure with "
                "distill.teacher_model=PRESET (e.g. PE-Core-L14-336), or give a stage's export/ folder")
        try:
            teacher = parent.build_model(preset)
        except CheckpointError as err:
            hint = f" (is distill.teacher_model={preset} its structure?)" if preset and not has_structure else ""
            raise DistillTeacherError(f"distill teacher {parent.weights}: {err}{hint}. Give a PE-Core weights file "
                                      "or a finished stage's export/ folder") from None
        except ValueError as err:  # an unknown preset name
            raise DistillTeacherError(f"distill.teacher_model: {err}") from None
        if teacher.vision_only:
            raise DistillTeacherError(f"distill teacher {parent.weights} is vision-only: CLIP distillation needs "
                                      "a PE-Core (CLIP) teacher with a text tower")
        return teacher

    def _cached_teacher(self, parent: Export) -> nn.Module:
        from pe_lightning.teachers.clip_cache import read_manifest

        manifest = read_manifest(self.args.cache)
        params = manifest["params"]
        return CachedTeacher(manifest.get("teacher_logit_scale"), params["embed_dim"], params["teacher_image_size"])

    @property
    def cached(self) -> bool:
        return bool(self.args.cache)

    @property
    def teacher_dim(self) -> int:
        t = self.teacher
        return t.embed_dim if isinstance(t, CachedTeacher) else int(t.visual.cfg.output_dim)

    def _check_teacher_resolution(self) -> int:
        t = self.teacher
        if isinstance(t, CachedTeacher):
            return int(self.args.teacher_resolution or t.image_size)  # the cache's decoder checks it is the cache's
        native, patch = int(t.visual.cfg.image_size), int(t.visual.patch_size)
        res = int(self.args.teacher_resolution or native)
        if res % patch:
            raise RecipeError(f"distill.teacher_resolution={res} is not a multiple of the teacher's patch size "
                              f"{patch}")
        if res > self.cfg.data.image_size:
            raise RecipeError(f"distill.teacher_resolution={res} exceeds data.image_size={self.cfg.data.image_size}"
                              ": the loader emits data.image_size; raise it (the student resizes down to its own "
                              "phases) or lower distill.teacher_resolution")
        return res

    def parent_model(self) -> Optional[nn.Module]:
        """The teacher (whatever `init` is): the `parent_` / `teacher_` figures are the teacher's."""
        if "teacher" not in self.parents:
            return None
        if self.cached:  # the stand-in has no towers: build the real teacher for its evaluation
            return self._load_teacher(self.parents["teacher"]).to(self.device)
        return self.teacher

    def tokenizers(self):
        """(student tokenizer, teacher tokenizer or None when the context lengths agree or the teacher is cached)."""
        from pe_lightning.models.tokenizer import get_tokenizer

        student = self.tokenizer()
        if self.cached or "teacher" not in self._frozen or self.teacher.context_length == self.model.context_length:
            return student, None
        return student, get_tokenizer(self.teacher.context_length)

    # ----- data -----
    def datamodule(self):
        from pe_lightning.data.distill_data import DistillDataModule
        from pe_lightning.teachers.clip_cache import teacher_fingerprint

        self._require_teacher()
        student_tok, teacher_tok = self.tokenizers()
        cache = None
        if self.cached:
            cache = {"cache_dir": self.args.cache, "teacher": teacher_fingerprint(self.parents["teacher"].weights),
                     "teacher_image_size": self.teacher_resolution}
        return DistillDataModule(self.cfg.data, tokenize=student_tok, seed=self.cfg.seed, schedule=self.schedule,
                                 teacher_tokenize=teacher_tok, cache=cache)

    def _require_teacher(self) -> None:
        if self.distill_loss is None:
            raise RecipeError("the distill stage has no teacher: run the video stage first (make stage=video), or "
                              "give one with distill.teacher=PATH (an export folder or a PE-Core file)")

    # ----- the loss -----
    def teacher_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's un-normalised image and text embeddings of the batch: cached, or a no-grad forward at
        its own resolution and with its own tokens (the step's autocast gives it the training precision)."""
        from pe_lightning.data.transforms import resize_to

        if self.cached:
            return batch["teacher_image"], batch["teacher_text"]
        with torch.no_grad():
            image = self.teacher.encode_image(resize_to(batch["image"], self.teacher_resolution))
            text = self.teacher.encode_text(batch.get("teacher_tokens", batch["text"]))
        return image, text

    def loss(self, batch: dict, phase: Phase) -> torch.Tensor:
        from pe_lightning.data.transforms import resize_to

        self._require_teacher()
        images = resize_to(batch["image"], phase.resolution)
        clamp_logit_scale(self.model.logit_scale, self.args.max_logit_scale)
        teacher_image, teacher_text = self.teacher_features(batch)
        out = self.distill_loss(self.model.encode_image(images), self.model.encode_text(batch["text"]),
                                self.model.logit_scale, teacher_image, teacher_text, self.teacher.logit_scale)
        loss = out.total
        self.log("train/loss", out.total, prog_bar=True)
        self.log("train/loss_distill", out.distill)
        self.log("train/loss_contrastive", out.contrastive)
        if self.args.feature_weight > 0:
            self.log("train/loss_feature", out.feature)
        self.log("train/teacher_scale", out.teacher_scale)
        self.log("train/student_scale", self.model.logit_scale.detach().exp())
        if self.scratch is not None:
            loss_scratch = self.scratch_loss(images, batch["text"])
            self.log("train/loss_scratch", loss_scratch)
            loss = loss + loss_scratch  # disjoint parameters: each student gets only its own gradient
        self.log_progress(phase)
        return loss

    def scratch_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The baseline's objective: pretraining's plain CLIP loss (no mask regularisation: neither student has it)."""
        clamp_logit_scale(self.scratch.logit_scale, self.args.max_logit_scale)
        return clip_loss(self.scratch.encode_image(images), self.scratch.encode_text(tokens), self.scratch.logit_scale)

    def flops_per_sample(self, resolution: int) -> float:
        """Student training FLOPs + the teacher's forward (a third of its training FLOPs; 0 when cached) + the
        baseline's training FLOPs when it trains alongside."""
        from pe_lightning.perf import tower_training_flops

        student = super().flops_per_sample(resolution)
        teacher = 0.0
        if not self.cached and "teacher" in self._frozen:
            res = self.teacher_resolution
            if res not in self._teacher_flops:
                self._teacher_flops[res] = sum(tower_training_flops(self.teacher.cfg, res).values()) / 3
            teacher = self._teacher_flops[res]
        return student * (2 if self.scratch is not None else 1) + teacher

    # ----- optimizers: the student (+ projector) through Lightning, the baseline stepped beside it -----
    def trainable_module(self) -> nn.Module:
        parts = {"model": self.model}
        if self.distill_loss is not None and self.distill_loss.projector is not None:
            parts["projector"] = self.distill_loss.projector
        return nn.ModuleDict(parts)

    def sharded_modules(self) -> tuple[nn.Module, ...]:
        """Under FSDP: the student and the feature term's projector (trained, not exported), each sharded."""
        return tuple(self.trainable_module().values())

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        if self.scratch is not None:
            self._check_baseline_fits_strategy()
            o = self.cfg.optim
            names = tuple(f"{p}.{n}" if p else n for p, m in self.scratch.named_modules()
                          for n in (m.no_weight_decay() if callable(getattr(m, "no_weight_decay", None)) else ()))
            groups = param_groups(self.scratch, o.weight_decay, extra_no_decay=names)
            ratio = float(self.args.scratch_lr) / float(o.lr) if self.args.scratch_lr is not None else 1.0
            for group in groups:
                group["lr_scale"] = ratio
            self._scratch_optimizer = build_optimizer(groups, o.name, o.lr * ratio, o.weight_decay,
                                                      (o.beta1, o.beta2), o.eps, grad_clip=o.grad_clip,
                                                      compile=o.compile)
            if self._scratch_state is not None:
                self._scratch_optimizer.load_state_dict(self._scratch_state)
                self._scratch_state = None
        return optimizer

    def _check_baseline_fits_strategy(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = getattr(self._trainer, "strategy", None)
        if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise RecipeError("distill.scratch_baseline=true does not run under FSDP (its optimizer is stepped by "
                              "the stage, outside the strategy): use trainer.strategy=ddp or scratch_baseline=false")
        precision = str(getattr(self._trainer, "precision", ""))
        if precision.startswith("16"):
            raise RecipeError(f"distill.scratch_baseline=true with trainer.precision={precision}: the loss scaler "
                              "unscales only the student's gradients. Use bf16-mixed, or scratch_baseline=false")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The student's step (the closure runs the forward and backward of both students), then the baseline's
        with its own clipping (AdamW here; LAMB clips inside its step)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._scratch_optimizer is not None:
            o = self.cfg.optim
            if o.name != "lamb" and o.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.scratch.parameters(), float(o.grad_clip))
            self._scratch_optimizer.step()
            self._scratch_optimizer.zero_grad(set_to_none=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._scratch_optimizer is not None:
            set_lr(self._scratch_optimizer, self.lr_schedule(self.samples_seen))  # x its lr_scale

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._scratch_optimizer is not None:
            checkpoint["scratch_optimizer"] = self._scratch_optimizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("scratch_optimizer")
        if state is not None:  # Lightning restores the module before it builds the optimizers
            if self._scratch_optimizer is not None:
                self._scratch_optimizer.load_state_dict(state)
            else:
                self._scratch_state = state

    def teacher_phase(self) -> Phase:
        """The current phase at the teacher's resolution (what the eval callback evaluates the teacher at)."""
        return replace(self.current_phase, resolution=self.teacher_resolution)
