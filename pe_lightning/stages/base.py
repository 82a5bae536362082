"""The stage contract: what every stage shares, and the hooks a stage overrides to be itself.

A stage is one file `stages/<name>.py` with a `PEStage` subclass that reads like its loss:

    class MyStage(PEStage):
        name = "mine"                       # its recipe section is `mine:` and its folder runs/<run>/mine/
        Args = MyArgs                       # a dataclass: the stage's own recipe keys, typed and checked
        roles = ("init", "teacher")         # the parent roles it takes (recipes/pipeline.yaml)
        headline_metrics = ("my_top1",)     # read by `status`, the report and the eval callback's log line

        def build_model(self, init):        # the trained network (default: the PE CLIP of `model:`)
        def build_teacher(self, parent):    # a frozen network, rebuilt from the parent on every start
        def datamodule(self):               # its LightningDataModule, handed the tokenizer and schedule
        def loss(self, batch, phase):       # the objective
        def batch_samples(self, batch):     # samples in a batch (nested batches sum)
        def flops_per_sample(self, res):    # read by the throughput callback
        def finish_training(self):          # once, after the last sample and before the evals and export
        def export(self, out_dir):          # weights in Meta's layout

Shared here: the optimizer and its parameter groups, gradient clipping, the lr and phase schedules as pure
functions of `samples_seen`, per-step reseeding (so a resumed run continues exactly as an uninterrupted one
would), frozen teachers kept outside the state dict, checkpoint bookkeeping and the export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pe_lightning.config import RecipeError
from pe_lightning.exports import Export, write_model_json
from pe_lightning.stages.optim import WarmupCosine, build_optimizer, param_groups, set_lr
from pe_lightning.stages.phases import Phase, PhaseSchedule


@dataclass(frozen=True)
class Headline:
    """A stage's one figure for `status` and the report: metrics[key], and its gain over metrics[versus]
    (the baseline the stage exists to beat: the scratch student, the blind LM, the parent export)."""
    label: str
    key: str
    versus: Optional[str] = None
    versus_name: str = ""

    def format(self, metrics: Mapping[str, Any]) -> str:
        if self.key not in metrics:
            return f"{self.label} not measured"
        text = f"{self.label} {100 * metrics[self.key]:.1f}%"
        if self.versus and self.versus in metrics:
            text += f" ({100 * (metrics[self.key] - metrics[self.versus]):+.1f} over {self.versus_name})"
        return text


@dataclass
class NoArgs:
    """A stage without keys of its own."""


class PEStage(L.LightningModule):
    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    roles: ClassVar[tuple[str, ...]] = ("init",)
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    headline: ClassVar[Optional[Headline]] = None  # the one figure of `status` and the report (None: none)
    # Why the stage must train at one resolution (None: progressive resolution is allowed).
    one_resolution_because: ClassVar[Optional[str]] = None

    def __init__(self, cfg: DictConfig, parents: Optional[Mapping[str, Export]] = None, fresh: bool = True):
        """`parents`: role -> Export. A fresh stage loads its `init` parent's weights; a resumed one gets them
        from its checkpoint. Teachers are rebuilt from their parent in both cases."""
        super().__init__()
        self.cfg = cfg
        self.args = cfg[self.name] if self.name in cfg else OmegaConf.structured(self.Args)
        self.save_hyperparameters({"recipe": OmegaConf.to_container(cfg, resolve=True)})
        self.parents: dict[str, Export] = dict(parents or {})
        self._frozen: dict[str, nn.Module] = {}  # a plain dict: teachers are not submodules (see set_teacher)
        self.samples_seen = 0  # global samples trained on (all ranks)
        self.train_seconds = 0.0  # wall time spent in fit, summed over resumes
        self.metrics: dict[str, Any] = {}  # headline metrics, written to export/metrics.json
        self.training_finished = False  # finish_training() has run (checkpointed: it runs exactly once)
        self.model = self.build_model(self.parents.get("init") if fresh else None)
        if "teacher" in self.parents:
            self.set_teacher("teacher", self.build_teacher(self.parents["teacher"]))
        self.schedule = self.build_schedule()
        self.lr_schedule = self._build_lr_schedule()
        self._fit_started_at = 0.0
        self._replicated: list[nn.Parameter] = []  # under FSDP: the parameters every rank holds whole
        self._unsharded = False  # under FSDP, after training: rank 0's self.model is the gathered whole network
        self.current_phase = self.phase()  # the phase of the batch being trained (set at batch start)
        if cfg.model.compile:
            self.compile_model()

    # ----- hooks with the CLIP defaults of pretraining -----
    def build_model(self, init: Optional[Export]) -> nn.Module:
        """The network this stage trains: the PE CLIP model of `model:`, with `init`'s weights if given."""
        from pe_lightning.models import build_model, load_checkpoint

        m = self.cfg.model
        model = build_model(m.preset, vision=dict(m.vision), text=dict(m.text))
        if init is not None:
            load_checkpoint(model, init.weights)
        return model

    def init_structure(self, init: Optional[Export]):
        """The CLIPConfig of the init parent (its model.json, else the preset of `model:`), for stages that
        reshape it (lang truncates it, spatial drops its head). On resume `init` is None and the pipeline's
        `init` parent still says the structure the checkpoint holds."""
        from pe_lightning.models.presets import get_preset

        m = self.cfg.model
        source = init or self.parents.get("init")
        if source is not None:
            return source.model_config(m.preset, dict(m.vision), dict(m.text))
        return get_preset(m.preset, vision=dict(m.vision), text=dict(m.text))

    def build_teacher(self, parent: Export) -> nn.Module:
        """A frozen network built from a parent export (its own structure), rebuilt on every start."""
        m = self.cfg.model
        return parent.build_model(m.preset, dict(m.vision), dict(m.text))

    def datamodule(self) -> L.LightningDataModule:
        """Image-text batches {"image", "text"} with this model's tokenizer, batch sizes from the schedule."""
        from pe_lightning.data.datamodule import ImageTextDataModule

        return ImageTextDataModule(self.cfg.data, tokenize=self.tokenizer(), seed=self.cfg.seed,
                                   schedule=self.schedule)

    def tokenizer(self):
        from pe_lightning.models.tokenizer import get_tokenizer

        return get_tokenizer(self.model.context_length)

    def loss(self, batch: Any, phase: Phase) -> torch.Tensor:
        """The stage's objective on one batch (every stage defines it)."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(batch, phase)")

    def batch_samples(self, batch: Any) -> int:
        """Samples in a batch on this rank; a nested batch ({"image": {...}, "video": {...}}) sums its parts."""
        if isinstance(batch, Mapping):
            parts = [v for v in batch.values() if isinstance(v, Mapping)]
            if parts:
                return sum(self.batch_samples(p) for p in parts)
            return next(len(v) for v in batch.values() if torch.is_tensor(v) or isinstance(v, list))
        return len(batch)

    def flops_per_sample(self, resolution: int) -> float:
        """Training FLOPs (forward + backward) of one sample at `resolution`: image and text towers."""
        from pe_lightning.perf import tower_training_flops

        m = self.cfg.model
        return sum(tower_training_flops(m.preset, resolution, dict(m.vision), dict(m.text)).values())

    def parent_model(self) -> Optional[nn.Module]:
        """The model of the first parent (init, else teacher), for the `parent_` figures of metrics.json."""
        for role in ("init", "teacher"):
            if role in self.parents:
                if role == "teacher" and "teacher" in self._frozen:
                    return self._frozen["teacher"]
                return self.build_teacher(self.parents[role]).to(self.device)
        return None

    def finish_training(self) -> None:
        """Runs once, after the last sample is trained and before the evals and the export (e.g. the video
        stage's blend with its parent). Also on a resume from a checkpoint of the final step written before it
        ran. Default: nothing."""

    def eval_model(self) -> nn.Module:
        """The model the eval callbacks evaluate (the trained network; under FSDP a collective, see
        `whole_model`)."""
        return self.whole_model()

    def whole_model(self) -> nn.Module:
        """The trained network with whole weights: `self.model`, or under FSDP a plain copy gathered from every
        rank's shards. Under FSDP it is a collective (every rank calls it) and only global rank 0 gets the copy;
        the other ranks get their sharded model back (they neither evaluate nor export)."""
        from pe_lightning.sharding import is_sharded, whole_state_dict

        if self._unsharded or not is_sharded(self._trainer):
            return self.model
        state = whole_state_dict(self.model)
        if self.global_rank != 0:
            return self.model
        whole = self.build_model(None)  # the structure a resumed stage builds, weights from the shards
        whole.load_state_dict(state)
        return whole.to(self.device)

    def export(self, out_dir: Path) -> None:
        """Write this stage's weights in Meta's layout into `out_dir` (the manager makes the folder atomic)."""
        from pe_lightning.models.checkpoint import export_checkpoint

        export_checkpoint(self.model, out_dir / "model.pt")
        write_model_json(self.model, out_dir)

    def compile_model(self) -> None:
        """torch.compile each tower in place (state-dict keys unchanged). Shapes change only at phase
        boundaries and for the masked sub-batch, so a run compiles a handful of graphs, not one per step."""
        self.model.visual.compile(dynamic=False)
        if not self.model.vision_only:
            self.model.transformer.compile(dynamic=False)

    # ----- frozen teachers -----
    def set_teacher(self, name: str, module: nn.Module) -> nn.Module:
        """Keep `module` frozen: eval mode, no gradients, outside `state_dict` (never in a checkpoint or an
        export), outside DDP's parameter sync, moved and cast with the stage. Rebuilt on every start."""
        module.eval()
        module.requires_grad_(False)
        ref = next(self.parameters(), None)
        if ref is not None:
            module.to(ref.device)
        self._frozen[name] = module
        return module

    @property
    def teacher(self) -> nn.Module:
        if "teacher" not in self._frozen:
            raise RuntimeError(f"stage {self.name!r} has no teacher")
        return self._frozen["teacher"]

    def _apply(self, fn, recurse: bool = True):  # .to(device), .half(), ...: the teachers follow
        super()._apply(fn, recurse)
        for module in self._frozen.values():
            module._apply(fn)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen.values():
            module.eval()
        return self

    # ----- schedule over samples seen -----
    def build_schedule(self, world_size: int = 1) -> PhaseSchedule:
        """The phases (resolution, global batch) over samples seen, checked against the model and the data."""
        train, data = self.cfg.train, self.cfg.data
        phases = [Phase(p.until_samples, p.resolution, p.batch_size) for p in train.phases]
        if not phases:
            phases = [Phase(train.total_samples, data.image_size, train.batch_size)]
        try:
            schedule = PhaseSchedule(phases, train.total_samples, patch_size=self.patch_size,
                                     chunk_size=data.chunk_size, world_size=world_size)
        except ValueError as err:
            raise RecipeError(f"train.phases: {err}") from None
        too_large = [p.resolution for p in schedule if p.resolution > data.image_size]
        if too_large:
            raise RecipeError(f"train.phases resolution {too_large[0]} exceeds data.image_size {data.image_size}: "
                              "the loader emits data.image_size; raise it")
        resolutions = sorted({p.resolution for p in schedule})
        if self.one_resolution_because and len(resolutions) > 1:
            raise RecipeError(f"train.phases: the {self.name} stage trains at one resolution "
                              f"({self.one_resolution_because}), got {resolutions}; give every phase the same one")
        return schedule

    @property
    def patch_size(self) -> int:
        visual = getattr(self.model, "visual", self.model)
        return int(visual.patch_size)

    def _build_lr_schedule(self) -> WarmupCosine:
        o = self.cfg.optim
        try:
            return WarmupCosine(o.lr, o.warmup_samples, self.cfg.train.total_samples, o.min_lr_ratio)
        except ValueError as err:
            raise RecipeError(f"optim: {err}") from None

    def setup(self, stage: str) -> None:
        """The number of processes is known now: every phase's global batch must split into whole data chunks
        on every rank. Checked here, on all ranks, rather than at the first batch of the phase that breaks."""
        world = self.trainer.world_size
        if world > 1:
            try:
                self.schedule = self.build_schedule(world)
            except RecipeError as err:
                detail = str(err).removeprefix("train.phases: ")
                raise RecipeError(
                    f"train.phases over {world} processes: {detail}. Batch sizes are global (summed over ranks): "
                    f"make each a multiple of {world} x data.chunk_size, or lower data.chunk_size") from None

    def phase(self) -> Phase:
        return self.schedule.at(self.samples_seen)[1]

    @property
    def finished(self) -> bool:
        return self.samples_seen >= self.cfg.train.total_samples

    # ----- optimizer -----
    def configure_optimizers(self):
        o = self.cfg.optim
        self._check_optimizer_fits_strategy()
        groups = param_groups(self.trainable_module(), o.weight_decay, extra_no_decay=self.no_weight_decay())
        for group in groups:
            if group["group_name"] == "no_decay":
                group["lr_scale"] = float(o.no_decay_lr_scale)
        return build_optimizer(groups, o.name, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps,
                               grad_clip=o.grad_clip, compile=o.compile, **self.optimizer_options())

    def optimizer_options(self) -> dict:
        """Keyword options of the optimizer beyond the shared ones (LAMB's always_adapt)."""
        o = self.cfg.optim
        return {"always_adapt": bool(o.lamb_always_adapt)} if o.name == "lamb" else {}

    def no_weight_decay(self) -> tuple[str, ...]:
        """Extra parameter names (dotted suffixes) without weight decay, from the models' own
        `no_weight_decay()` facts (timm's convention), on top of the shared rules in optim.py."""
        names: list[str] = []
        for prefix, module in self.trainable_module().named_modules():
            facts = getattr(module, "no_weight_decay", None)
            if callable(facts) and module is not self:
                names += [f"{prefix}.{n}" if prefix else n for n in facts()]
        return tuple(names)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Global-norm clipping at `optim.grad_clip`. LAMB clips inside its own step (one fused pass)."""
        o = self.cfg.optim
        if o.name != "lamb" and o.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=float(o.grad_clip), gradient_clip_algorithm="norm")

    def _check_optimizer_fits_strategy(self) -> None:
        """LAMB's trust ratio and its clipping need the norm of each whole weight and of the whole gradient.
        Our `fsdp` (FSDP2, sharding.py) shards weight by weight and FusedLamb sums the slices' norms over the
        ranks; Lightning's FSDP1 strategies flatten weights together, so every rank would use a slice's norm."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = getattr(self._trainer, "strategy", None)
        if self.cfg.optim.name == "lamb" and isinstance(strategy, FSDPStrategy):
            raise RecipeError(
                f"optim.name=lamb does not run under trainer.strategy={self.cfg.trainer.strategy} (Lightning's "
                "FSDP1, which flattens weights together, so no rank sees a whole weight's norm). Use "
                "trainer.strategy=fsdp (FSDP2, weight by weight: LAMB's norms are summed over the shards) or ddp")

    # ----- sharding (trainer.strategy=fsdp) -----
    def configure_model(self) -> None:
        """Under FSDP (Lightning calls this with the device mesh set), shard the trained network block by block
        (sharding.py). Other strategies: nothing to do."""
        from pe_lightning.sharding import is_sharded, mixed_precision_policy, shard_module

        if not is_sharded(self._trainer) or any(hasattr(p, "placements") for p in self.model.parameters()):
            return  # not FSDP, or already sharded (Lightning may call this more than once)
        policy = mixed_precision_policy(str(self.trainer.precision))
        for module in self.sharded_modules():
            self._replicated += shard_module(module, self.device_mesh["data_parallel"], policy)

    def sharded_modules(self) -> tuple[nn.Module, ...]:
        """The trained networks FSDP shards (default: the model; distill adds its feature projector)."""
        return (self.model,)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Under FSDP: average the gradients of the parameters every rank holds whole (DDP would have)."""
        if self._replicated:
            from pe_lightning.sharding import average_replicated_grads

            average_replicated_grads(self._replicated, self.device_mesh["data_parallel"].get_group())

    def trainable_module(self) -> nn.Module:
        return self.model

    # ----- per-step bookkeeping -----
    def on_train_start(self) -> None:
        self._fit_started_at = time.monotonic() - self.train_seconds
        if self.finished:  # resumed from the final step's checkpoint: train nothing more, finish
            self.trainer.should_stop = True
            self._finish_once()

    def _finish_once(self) -> None:
        if not self.training_finished:
            self._unshard()
            if self.global_rank == 0 or not self._unsharded:  # under FSDP the other ranks keep only shards
                self.finish_training()
            self.training_finished = True

    def _unshard(self) -> None:
        """Under FSDP, once training is over: rank 0's `self.model` becomes the gathered whole network, so that
        finish_training (the video stage's blend), the evals and the export read whole weights as on one
        process. Every rank runs this (a collective)."""
        from pe_lightning.sharding import is_sharded

        if is_sharded(self._trainer) and not self._unsharded:
            self.model = self.whole_model()
            self._unsharded = True

    def on_train_end(self) -> None:
        """Bad samples skipped during the stage, per reason, summed over ranks, into metrics.json:
        `data_skipped` (the total, 0 when nothing was skipped) and `skipped_<part>_<reason>` for each reason
        met (`skipped_bad_image`, `skipped_video_bad_video`, ...). Every rank calls it (a collective)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        counts = dict(datamodule.skipped()) if hasattr(datamodule, "skipped") else {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, counts)
            counts = {}
            for rank_counts in everyone:
                for key, n in rank_counts.items():
                    counts[key] = counts.get(key, 0) + n
        self.metrics["data_skipped"] = int(sum(counts.values()))
        for key, n in counts.items():
            self.metrics["skipped_" + key.replace("/", "_")] = int(n)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.global_step * 7919 + self.global_rank)
        self.current_phase = self.phase()
        lr = self.lr_schedule(self.samples_seen)
        for optimizer in self.trainer.optimizers:
            set_lr(optimizer, lr)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.current_phase)
        # Counted here, not in on_train_batch_end: Lightning runs the callbacks' on_train_batch_end (the
        # checkpoint among them) before the module's, and a checkpoint must hold the count of this batch.
        self.samples_seen += self.batch_samples(batch) * self.trainer.world_size
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        grad_norm = getattr(self.trainer.optimizers[0], "last_grad_norm", None) if self.trainer.optimizers else None
        if grad_norm is not None:  # a device tensor: logging it costs no sync until the log step reads it
            self.log("train/grad_norm", grad_norm)
        self.train_seconds = time.monotonic() - self._fit_started_at
        if self.finished:
            self.trainer.should_stop = True
            self._finish_once()  # the module's hook runs after the callbacks': the final checkpoint is pre-finish

    def log_scalars(self, values: dict[str, float]) -> None:
        """Log host-side numbers as CPU tensors: Lightning copies a Python float to the GPU, a blocking copy
        that would stall the step until the GPU caught up."""
        for name, value in values.items():
            self.log(name, torch.tensor(float(value), dtype=torch.float64), prog_bar=name == "train/batch_size")

    def log_progress(self, phase: Phase) -> None:
        self.log_scalars({"train/lr": self.lr_schedule(self.samples_seen), "train/resolution": phase.resolution,
                          "train/batch_size": phase.batch_size, "train/samples_seen": self.samples_seen})

    # ----- checkpoint state beyond Lightning's -----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["pe_state"] = {"samples_seen": self.samples_seen, "train_seconds": self.train_seconds,
                                  "metrics": self.metrics, "training_finished": self.training_finished,
                                  "carried_mask_tokens": self._carried_mask_tokens()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("pe_state", {})
        self.samples_seen = int(state.get("samples_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.metrics = dict(state.get("metrics", {}))
        self.training_finished = bool(state.get("training_finished", False))
        for name, token in state.get("carried_mask_tokens", {}).items():
            self.get_submodule(name).carried_mask_token = token

    def _carried_mask_tokens(self) -> dict[str, torch.Tensor]:
        """A parent's mask token that a tower without one passes on to its export (models/checkpoint.py): a plain
        attribute in no state dict, so the checkpoint carries it, or a resumed stage would export without it."""
        return {name: m.carried_mask_token for name, m in self.named_modules()
                if getattr(m, "carried_mask_token", None) is not None}
