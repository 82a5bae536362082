"""Stage 4: language alignment, PE-Lang (PE_REFERENCE.md s.6-7, STAGE_ANCHORS.md s.3).

    tokens       = encoder_k(image)[:, no class token]            the first k blocks; no ln_post / attn pool / proj
    image_embeds = Projector(tokens)                              Linear(W->D), GELU, Linear(D->D), 2x2 avg pooling
    embeds       = LM token embeddings with image_embeds spliced in at the image placeholder positions
    loss         = next-token cross-entropy on the answer tokens only

Two phases over samples seen (`lang.projector_samples` splits train.total_samples):
- **warm-up** (PLM stage 1): only the projector trains; the encoder and the LM are frozen (lr `lang.projector_lr`,
  PLM 1e-4, AdamW betas 0.9/0.95).
- **full** (PLM stage 2): encoder, projector and LM all train (lr `optim.lr`, PLM 4e-5 for every part; each
  part's lr is optim.lr times `lang.{encoder,projector,lm,blind_lm}_lr_scale`, our keys); LayerScale and DropPath (0.1,
  PLM) are in the encoder. The gammas exist from the start at 1.0 (x * 1.0 is exact, so the warm-up encoder is
  the parent's function) and become `lang.layer_scale` at the switch, in one of two ways
  (`lang.layer_scale_mode`):
  - `preserve` (our default): the inverse factor is folded into each block's branch output projections
    (attention out_proj, MLP c_proj), so the encoder's function at the first full-phase step is the warm-up's
    and only the parametrisation changes (a gamma of 0.1 trains 10x faster relative to its branch);
  - `plm` (PLM's published behaviour): the gammas are set to 0.1 on weights trained without LayerScale, so every
    residual branch shrinks 10x at that moment. PLM's ~35k steps can recover from it; at a few hundred steps an
    Adam step moves a gamma by about the lr and the encoder stays damaged (measured: README, "Lang").
  0 builds no LayerScale at all.
Each phase has its own warmup (optim.warmup_samples) and cosine decay to optim.min_lr_ratio.

Frozen parts keep `requires_grad=True` as registered parameters (so DDP, which registers its parameters once,
syncs them after the switch); a frozen part runs with its weights out of the graph: the encoder under no_grad,
the LM with requires_grad switched off for its forward only (the backward still reaches the projector through
it, without weight gradients). Parameters without a gradient are not stepped by AdamW. Under DDP use
`trainer.strategy=ddp_find_unused_parameters_true`.

The blind baseline (`lang.blind_baseline`, on in the embedded recipe): a second copy of the LM trained on the
same batches with zeros where the image embeddings go (what `eval.vqa.vqa_eval(blind=True)` evaluates). In
the warm-up nothing of it could train (its image embeddings are zeros and its LM is frozen), so it trains in
the full phase only, at the same lr. Never exported; its VQA figures go to metrics.json as `vqa_blind_*`.

Export: `model.pt` (the PE-Lang encoder in Meta's layout: k blocks, LayerScale gammas, no head, vision keys
under `visual.`), `model.json`, `projector.pt/json` (HF PerceptionLM names), `lm/` (save_pretrained + tokenizer,
exactly the LM that was trained) and `lang.json` (how prompts are built: template, system text, image tokens,
resolution), read by `pe-lightning ask` (`load_lang_export`).
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from pe_lightning.config import RecipeError
from pe_lightning.data.datamodule import InstructionDataModule
from pe_lightning.data.instruction import InstructionDecoder
from pe_lightning.data.transforms import resize_to
from pe_lightning.exports import Export, write_model_json
from pe_lightning.stages.base import Headline, PEStage
from pe_lightning.stages.optim import WarmupCosine, build_optimizer, no_weight_decay, set_lr
from pe_lightning.stages.phases import Phase

LANG_JSON = "lang.json"
LM_FOLDER = "lm"
PARTS = ("encoder", "projector", "lm", "blind_lm")  # the full phase's lr parts (lang.<part>_lr_scale)
LAYER_SCALE_MODES = ("preserve", "plm")
LR_PART = {"visual": "encoder", "projector": "projector", "lm": "lm", "blind_lm": "blind_lm"}  # module -> lr part


@dataclass
class LangArgs:
    """The lang stage's keys (`lang:`). PLM's values where PLM publishes them; the rest is our choice."""

    lm: str = ""  # a HuggingFace causal-LM folder, a .gguf file, or "" = the embedded SmolLM2-135M-Instruct
    lm_cache: str = "data/lm"  # where a GGUF (the embedded one too) is converted once into an HF folder
    template: str = "auto"  # auto (the LM's chat template, else plain) | chat | plain
    system: Optional[str] = ""  # system message; "" = an empty one (shortest), None = the template's default
    max_length: int = 160  # tokens per sample, image tokens included; later turns are dropped to fit
    turns_per_sample: int = 0  # 0 = all of a sample's turns in one sequence; n = n drawn per sample (ours)
    layer: int = 0  # k: vision blocks kept (1-based); 0 = all but the last (Lang-L 23/24, LLaVA's -2)
    pooling: int = 2  # avg pooling of the token grid (PLM pooling_ratio: 1 in stage 1, 2 in stage 2; one here)
    pool_at: str = "after"  # after the projector (PLM) | before it (cheaper MLP, our option)
    projector: Optional[str] = None  # start the projector from a lang export's projector.pt (else N(0, 0.02))
    projector_samples: int = 0  # warm-up length (projector only), in samples; the rest is the full phase
    projector_lr: float = 1e-4  # warm-up peak lr (PLM stage 1); the full phase uses optim.lr (PLM 4e-5)
    encoder_lr_scale: float = 1.0  # full phase: encoder lr = optim.lr * this (PLM: 1.0; LLaVA-OV: 0.2)
    projector_lr_scale: float = 1.0  # full phase: projector lr = optim.lr * this (PLM: 1.0)
    lm_lr_scale: float = 1.0  # full phase: LM lr = optim.lr * this (PLM: 1.0)
    blind_lm_lr_scale: float = 1.0  # the blind baseline's LM: optim.lr * this (its own: a baseline at its best)
    train_encoder: bool = True  # full phase: the encoder trains (PLM); false keeps it frozen (LLaVA-1.5)
    layer_scale: float = 0.1  # LayerScale gamma from the switch on (PLM 0.1); 0 = no LayerScale
    layer_scale_mode: str = "plm"  # preserve (fold 1/gamma into the branch outputs: same function) | plm
    drop_path: float = 0.1  # DropPath in every encoder block during the full phase (PLM 0.1)
    blind_baseline: bool = False  # also train an LM copy with blank image embeddings on the same batches


def frozen_weights(module: nn.Module, frozen: bool = True):
    """Context: `module`'s parameters leave the autograd graph for the forward inside (no weight gradients; input
    gradients still flow through) and are trainable again afterwards (the graph is already built)."""
    if not frozen:
        return contextlib.nullcontext()
    params = [p for p in module.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def scope():
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    return scope()


class TwoPhaseLR:
    """Warm-up phase: WarmupCosine(projector_lr) over [0, split); full phase: WarmupCosine(lr) over the rest."""

    def __init__(self, projector_lr: float, lr: float, warmup: int, split: int, total: int, min_ratio: float):
        self.split = int(split)
        self.first = WarmupCosine(projector_lr, min(warmup, split), split, min_ratio) if split > 0 else None
        rest = total - self.split
        self.second = WarmupCosine(lr, min(warmup, rest), rest, min_ratio) if rest > 0 else None

    def __call__(self, samples_seen: float) -> float:
        if self.first is not None and (samples_seen < self.split or self.second is None):
            return self.first(samples_seen)
        return self.second(samples_seen - self.split)


class PELang(nn.Module):
    """The aligned model: `visual` (PE-Lang encoder), `projector`, `lm` (the HF causal LM)."""

    def __init__(self, visual: nn.Module, projector: nn.Module, lm: nn.Module):
        super().__init__()
        self.visual, self.projector, self.lm = visual, projector, lm

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> layer-k patch tokens [B, g*g, W] (class token stripped)."""
        return self.visual.forward_features(images)[:, self.visual.num_prefix_tokens:]


class LangDataModule(InstructionDataModule):
    """Instruction batches tokenized in the workers by the stage's TurnEncoder."""

    def __init__(self, cfg, encoder, turns_per_sample: int = 0, **kwargs):
        super().__init__(cfg, **kwargs)
        self.encoder = encoder
        self.turns_per_sample = int(turns_per_sample)

    def make_decoder(self) -> InstructionDecoder:
        return InstructionDecoder(self.cfg.image_size, self.cfg.augment, self.seed, encoder=self.encoder,
                                  turns_per_sample=self.turns_per_sample)


class LangStage(PEStage):
    """Projector warm-up, then full alignment of encoder + projector + LM, next-token loss on the answers."""

    name = "lang"
    Args = LangArgs
    roles = ("init",)
    headline_metrics = ("vqa_exact_match", "vqa_blind_exact_match", "vqa_warmup_exact_match",
                        "vqa_colour_exact_match", "vqa_shape_exact_match", "vqa_count_exact_match",
                        "vqa_size_exact_match", "vqa_position_exact_match", "vqa_yesno_exact_match")
    one_resolution_because = "the number of image tokens is part of every tokenized sample"
    headline = Headline("VQA exact match", "vqa_exact_match", "vqa_blind_exact_match", "blind")

    def __init__(self, cfg, parents=None, fresh: bool = True):
        a = cfg[self.name] if self.name in cfg else LangArgs()
        self._check_args(a, cfg)
        self.tokenizer_ = None
        self.blind_lm: Optional[nn.Module] = None
        self.layer_scale_set = False  # the full phase's gammas were written (saved in the checkpoint)
        self.full_phase_started = False  # the switch was applied (saved): the warm-up model is gone
        super().__init__(cfg, parents, fresh)

    @staticmethod
    def _check_args(a, cfg) -> None:
        total = int(cfg.train.total_samples)
        if not 0 <= a.projector_samples <= total:
            raise RecipeError(f"lang.projector_samples={a.projector_samples}: must be in [0, train.total_samples="
                              f"{total}]")
        if not 0.0 <= a.drop_path < 1.0:
            raise RecipeError(f"lang.drop_path={a.drop_path}: must be in [0, 1)")
        if a.layer_scale < 0:
            raise RecipeError(f"lang.layer_scale={a.layer_scale}: must be >= 0 (0 = no LayerScale)")
        if a.pool_at not in ("after", "before") or a.pooling < 1:
            raise RecipeError(f"lang.pooling={a.pooling}, lang.pool_at={a.pool_at!r}: pooling >= 1, pool_at "
                              "after | before")
        if a.template not in ("auto", "chat", "plain"):
            raise RecipeError(f"lang.template={a.template!r}: choose auto | chat | plain")
        if a.turns_per_sample < 0:
            raise RecipeError(f"lang.turns_per_sample={a.turns_per_sample}: must be >= 0 (0 = all turns)")
        for part in PARTS:
            if getattr(a, f"{part}_lr_scale") < 0:
                raise RecipeError(f"lang.{part}_lr_scale={getattr(a, f'{part}_lr_scale')}: must be >= 0")
        if a.layer_scale_mode not in LAYER_SCALE_MODES:
            raise RecipeError(f"lang.layer_scale_mode={a.layer_scale_mode!r}: choose "
                              f"{' | '.join(LAYER_SCALE_MODES)}")

    # ----- the model -----
    def build_model(self, init: Optional[Export]) -> nn.Module:
        from pe_lightning.models import PECLIP, load_checkpoint
        from pe_lightning.models.llm import embedding_width, load_lm, resolve_lm_path
        from pe_lightning.models.projector import Projector, load_projector

        a = self.args
        full = PECLIP(self.init_structure(init))
        if init is not None:
            load_checkpoint(full, init.weights)
        visual = full.visual
        depth = visual.layers
        k = int(a.layer) or max(1, depth - 1)
        if not 1 <= k <= depth:
            raise RecipeError(f"lang.layer={a.layer}: must be in 1..{depth} (the encoder's depth), or 0 for "
                              f"all but the last ({max(1, depth - 1)})")
        visual.truncate(k)
        visual.mask_token = None  # a training-time token of earlier stages; PE-Lang has none
        visual.cfg.use_mask_token = False
        if a.layer_scale > 0:
            visual.set_layer_scale(1.0)  # identity until the full phase sets lang.layer_scale
        lm, tokenizer = load_lm(resolve_lm_path(a.lm, a.lm_cache))
        lm.train()  # from_pretrained returns eval mode; an LM with dropout should train with it
        self.tokenizer_ = tokenizer
        width = embedding_width(lm)
        if a.projector:
            projector = load_projector(a.projector, lm_width=width, vision_width=visual.width)
            if (projector.pooling, projector.pool_at) != (a.pooling, a.pool_at):
                raise RecipeError(f"lang.projector={a.projector} pools {projector.pooling} ({projector.pool_at}), "
                                  f"the recipe {a.pooling} ({a.pool_at}): make lang.pooling / lang.pool_at agree")
        else:
            projector = Projector(visual.width, width, pooling=a.pooling, pool_at=a.pool_at)
        if a.blind_baseline:
            self.blind_lm = copy.deepcopy(lm)  # the same start; on resume both come from the checkpoint
        return PELang(visual, projector, lm)

    @property
    def tokenizer_obj(self):
        return self.tokenizer_

    def tokenizer(self):
        return None  # the CLIP text tokenizer of the base: none here (the LM's is `tokenizer_obj`)

    def compile_model(self) -> None:
        self.model.visual.compile(dynamic=False)

    # ----- schedule and data -----
    @property
    def resolution(self) -> int:
        return next(iter(self.schedule)).resolution

    @property
    def num_image_tokens(self) -> int:
        grid = self.resolution // self.patch_size
        return self.model.projector.num_output_tokens(grid * grid)

    def turn_encoder(self):
        from pe_lightning.models.llm import TurnEncoder

        a = self.args
        return TurnEncoder(self.tokenizer_obj, self.num_image_tokens, int(a.max_length), template=a.template,
                           system=a.system)

    def datamodule(self):
        return LangDataModule(self.cfg.data, self.turn_encoder(), turns_per_sample=self.args.turns_per_sample,
                              seed=self.cfg.seed, schedule=self.schedule)

    # ----- phases -----
    def in_full_phase(self, samples_seen: Optional[int] = None) -> bool:
        s = self.samples_seen if samples_seen is None else samples_seen
        return s >= int(self.args.projector_samples)

    def apply_phase(self) -> None:
        """Put the encoder in the current phase's shape: DropPath on in the full phase only, and the LayerScale
        gammas set to lang.layer_scale once, at the switch (a resumed full phase has them in its checkpoint)."""
        a, visual = self.args, self.model.visual
        full = self.in_full_phase()
        rate = float(a.drop_path) if full and a.train_encoder else 0.0
        if visual.cfg.drop_path != rate:
            visual.set_drop_path(rate)
        if full and a.layer_scale > 0 and not self.layer_scale_set:
            self.switch_layer_scale(visual, float(a.layer_scale), a.layer_scale_mode)
            self.layer_scale_set = True
        self.full_phase_started = self.full_phase_started or full

    @staticmethod
    @torch.no_grad()
    def switch_layer_scale(visual: nn.Module, value: float, mode: str) -> None:
        """The gammas become `value`: folded into the branch outputs (`preserve`: the same function) or written
        over them (`plm`: every branch scaled by value / old gamma)."""
        if mode == "preserve":
            visual.rescale_layer_scale(value)
            return
        for name, p in visual.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(value)

    def part_lr_scale(self, part: str) -> float:
        """A part's lr relative to the schedule's: the warm-up trains the projector alone at projector_lr (x1);
        the full phase gives each part optim.lr x lang.<part>_lr_scale."""
        if not self.in_full_phase():
            return 1.0
        return float(getattr(self.args, f"{part}_lr_scale"))

    def _build_lr_schedule(self):
        o, a = self.cfg.optim, self.args
        try:
            return TwoPhaseLR(a.projector_lr, o.lr, o.warmup_samples, a.projector_samples,
                              self.cfg.train.total_samples, o.min_lr_ratio)
        except ValueError as err:
            raise RecipeError(f"optim / lang: {err}") from None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.apply_phase()
        for optimizer in self.trainer.optimizers:
            self.set_part_lrs(optimizer)

    def set_part_lrs(self, optimizer) -> None:
        """Each group's lr: the schedule's lr at samples_seen x its part's scale in the current phase."""
        for group in optimizer.param_groups:
            group["lr_scale"] = self.part_lr_scale(LR_PART[group["group_name"].split("/")[0]])
        set_lr(optimizer, self.lr_schedule(self.samples_seen))

    # ----- the loss -----
    def image_embeddings(self, images: torch.Tensor, train_encoder: bool) -> torch.Tensor:
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            tokens = self.model.patch_tokens(images)
        return self.model.projector(tokens)

    @staticmethod
    def answer_loss(lm: nn.Module, batch: dict, image_embeds: torch.Tensor, lm_frozen: bool) -> torch.Tensor:
        from pe_lightning.models.llm import embed_inputs, lm_answer_loss

        with frozen_weights(lm, lm_frozen):
            embeds = embed_inputs(lm, batch["input_ids"], image_embeds, batch["image_positions"])
            return lm_answer_loss(lm, embeds, batch["attention_mask"], batch["labels"])

    def loss(self, batch: dict, phase: Phase) -> torch.Tensor:
        from pe_lightning.models.llm import trim_padding

        batch = trim_padding(batch)
        full = self.in_full_phase()
        images = resize_to(batch["image"], phase.resolution)
        image_embeds = self.image_embeddings(images, train_encoder=full and self.args.train_encoder)
        loss = self.answer_loss(self.model.lm, batch, image_embeds, lm_frozen=not full)
        self.log("train/loss", loss, prog_bar=True)
        if self.blind_lm is not None and full:
            blind = self.answer_loss(self.blind_lm, batch, torch.zeros_like(image_embeds.detach()), lm_frozen=False)
            self.log("train/loss_blind", blind)
            loss = loss + blind  # disjoint parameters: each model gets only its own gradient
        self.log_scalars({"train/phase": 2.0 if full else 1.0})
        self.log_progress(phase)
        return loss

    # ----- optimizer: one AdamW, groups per part (lr scale), clipping per model -----
    def parts(self) -> dict[str, nn.Module]:
        out = {"visual": self.model.visual, "projector": self.model.projector, "lm": self.model.lm}
        if self.blind_lm is not None:
            out["blind_lm"] = self.blind_lm
        return out

    def configure_optimizers(self):
        from pe_lightning.models.llm import lm_no_weight_decay

        o = self.cfg.optim
        groups = []
        for part, module in self.parts().items():
            extra = lm_no_weight_decay(module) if part in ("lm", "blind_lm") else ()
            if part == "projector":
                extra = module.no_weight_decay()
            decay, keep = [], []
            for name, p in module.named_parameters():
                if p.requires_grad:
                    (keep if no_weight_decay(name, p, extra) else decay).append(p)
            for params, wd, kind in ((decay, o.weight_decay, "decay"), (keep, 0.0, "no_decay")):
                if params:  # lr_scale follows the phase (part_lr_scale, set at every batch start)
                    groups.append(dict(params=params, weight_decay=float(wd), group_name=f"{part}/{kind}",
                                       lr_scale=1.0))
        if o.name != "adamw":
            raise RecipeError(f"optim.name={o.name}: the lang stage uses AdamW (PLM); set optim.name=adamw")
        return build_optimizer(groups, o.name, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Global-norm clipping at optim.grad_clip, per model: the blind baseline's gradients never scale the
        aligned model's (and the reverse)."""
        clip = float(self.cfg.optim.grad_clip or 0)
        if not clip:
            return
        main = [p for n, m in self.parts().items() if n != "blind_lm" for p in m.parameters() if p.grad is not None]
        if main:
            torch.nn.utils.clip_grad_norm_(main, clip)
        if self.blind_lm is not None:
            blind = [p for p in self.blind_lm.parameters() if p.grad is not None]
            if blind:
                torch.nn.utils.clip_grad_norm_(blind, clip)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        if self.trainer.world_size > 1:
            if not isinstance(strategy, DDPStrategy):
                raise RecipeError(f"the lang stage runs on one process or under DDP, not {type(strategy).__name__}")
            if not strategy._ddp_kwargs.get("find_unused_parameters", False):
                raise RecipeError("the lang stage under DDP needs trainer.strategy=ddp_find_unused_parameters_true: "
                                  "the frozen parts (the warm-up's encoder and LM, the blind baseline) get no "
                                  "gradient in some steps")

    # ----- checkpoint -----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lang_state"] = {"layer_scale_set": self.layer_scale_set,
                                    "full_phase_started": self.full_phase_started}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lang_state", {})
        self.layer_scale_set = bool(state.get("layer_scale_set", False))
        self.full_phase_started = bool(state.get("full_phase_started", self.layer_scale_set))

    # ----- evaluation hooks -----
    def eval_model(self) -> nn.Module:
        return self.model

    def parent_model(self) -> Optional[nn.Module]:
        return None  # the parent has no LM: no parent_ VQA figures

    @torch.no_grad()
    def encode_for_eval(self, images: torch.Tensor) -> torch.Tensor:
        was = self.model.visual.training
        self.model.visual.eval()
        try:
            return self.model.patch_tokens(resize_to(images.to(self.device), self.resolution))
        finally:
            self.model.visual.train(was)

    def flops_per_sample(self, resolution: int) -> float:
        """Encoder forward (+ backward in the full phase) + ~6 * LM parameters per token of max_length
        (an upper bound: samples are shorter; the LM head runs on the answer tokens only)."""
        from pe_lightning.models import VisionTransformer
        from pe_lightning.perf import training_flops

        with torch.device("meta"):
            tower = VisionTransformer(self.model.visual.cfg)
            images = torch.zeros(1, 3, resolution, resolution)
        vision = training_flops(lambda: tower.forward_features(images))
        lm_params = sum(p.numel() for p in self.model.lm.parameters())
        lm = 6.0 * lm_params * int(self.args.max_length)
        return float(vision) + lm * (2 if self.blind_lm is not None else 1)

    # ----- export -----
    def export(self, out_dir: Path) -> None:
        from pe_lightning.models.checkpoint import export_checkpoint
        from pe_lightning.models.presets import CLIPConfig
        from pe_lightning.models.projector import save_projector

        visual = self.model.visual
        export_checkpoint(visual, out_dir / "model.pt")
        vision_cfg = copy.deepcopy(visual.cfg)
        vision_cfg.drop_path, vision_cfg.use_mask_token, vision_cfg.grad_checkpointing = 0.0, False, False
        if self.args.layer_scale > 0:
            vision_cfg.ls_init_value = float(self.args.layer_scale)
        write_model_json(SimpleNamespace(cfg=CLIPConfig(vision=vision_cfg, text=None,
                                                         name=f"PE-Lang-{self.cfg.model.preset}")), out_dir)
        save_projector(self.model.projector, out_dir)
        lm_dir = out_dir / LM_FOLDER
        self.model.lm.save_pretrained(lm_dir)
        self.tokenizer_obj.save_pretrained(lm_dir)
        a = self.args
        facts = {"layer": visual.layers, "truncated_from": visual.cfg.truncated_from, "resolution": self.resolution,
                 "num_image_tokens": self.num_image_tokens, "template": a.template, "system": a.system,
                 "max_length": int(a.max_length), "lm": LM_FOLDER, "lm_source": a.lm or "SmolLM2-135M-Instruct"}
        from pe_lightning.io import write_text_atomic

        write_text_atomic(out_dir / LANG_JSON, json.dumps(facts, indent=2) + "\n")


# ----- using an export: `pe-lightning ask` -----
@dataclass
class LangExport:
    visual: nn.Module
    projector: nn.Module
    lm: nn.Module
    tokenizer: Any
    facts: dict

    @torch.no_grad()
    def ask(self, images: torch.Tensor, questions: list[str], max_new_tokens: int = 16) -> list[str]:
        """Answers for preprocessed images [B, 3, S, S] (eval_transform at facts["resolution"])."""
        from pe_lightning.eval.vqa import answer_questions

        tokens = self.visual.forward_features(images)[:, self.visual.num_prefix_tokens:]
        return answer_questions(self.lm, self.tokenizer, self.projector, tokens, questions,
                                max_new_tokens=max_new_tokens, template=self.facts["template"],
                                system=self.facts["system"])


def load_lang_export(folder: str | Path) -> LangExport:
    """The three parts of a lang export (model.pt + model.json, projector, lm/), in eval mode."""
    from pe_lightning.models.llm import embedding_width, load_lm
    from pe_lightning.models.projector import load_projector

    folder = Path(folder)
    facts_file = folder / LANG_JSON
    if not facts_file.is_file():
        raise RecipeError(f"{folder} is not a lang export (no {LANG_JSON}); run `make stage=lang` first or give "
                          "the export/ folder of a lang run")
    facts = json.loads(facts_file.read_text())
    visual = Export.at(folder).build_model().visual.eval()
    lm, tokenizer = load_lm(folder / facts.get("lm", LM_FOLDER))
    projector = load_projector(folder, lm_width=embedding_width(lm), vision_width=visual.width).eval()
    return LangExport(visual, projector, lm.eval(), tokenizer, facts)


def ask_image(export: LangExport, image_path: str | Path, question: str, max_new_tokens: int = 16) -> str:
    from PIL import Image

    from pe_lightning.data.transforms import eval_transform

    path = Path(image_path)
    if not path.is_file():
        raise RecipeError(f"image={path}: no such file")
    with Image.open(path) as img:
        x = eval_transform(img, int(export.facts["resolution"]))[None]
    return export.ask(x, [question], max_new_tokens)[0]


def sweep_table(rows: list[tuple[str, dict]]) -> str:
    """The layer sweep's VQA table: one row per run (label, metrics.json)."""
    from pe_lightning.eval.vqa import QUESTION_TYPES

    cols = ["vqa_exact_match", "vqa_blind_exact_match", "vqa_warmup_exact_match",
            *[f"vqa_{t}_exact_match" for t in QUESTION_TYPES]]
    head = ["run", "all", "blind", "warm-up", *QUESTION_TYPES]
    lines = [" | ".join(f"{h:>8}" for h in head)]
    for label, metrics in rows:
        cells = [f"{metrics[c]:8.3f}" if isinstance(metrics.get(c), (int, float)) else f"{'-':>8}" for c in cols]
        lines.append(" | ".join([f"{label:>8}", *cells]))
    return "\n".join(lines)
