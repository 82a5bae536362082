"""The recipe: a typed schema, merged from YAML layers and command-line overrides.

Layers, later wins:
  schema defaults (the shared sections below + the stage's own `Args` under its name)
  -> recipes/base.yaml -> recipes/models/<model>.yaml (model keys) -> recipes/data/<data>.yaml (data and eval
  sets) -> recipes/<stage>/<model>.yaml (the stage's scale for that model: samples, phases, lr)
  -> recipes/<recipe>.yaml (the stage's method; a variant such as pretrain_vanilla) -> `key=value` overrides.
Files that do not exist are skipped. Every key is checked against the schema when the recipe is loaded, so a
typo fails at once with its name. This module knows no stage: the caller passes the stage's `Args` dataclass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pe_lightning.data.config import DataConfig
from pe_lightning.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# Files at the top of recipes/ that are not a stage's recipe: the shared base, the stage graph, the ladder.
NOT_STAGE_FILES = ("base.yaml", "pipeline.yaml", "ablation.yaml")


class RecipeError(UserError, ValueError):
    """A recipe that cannot be loaded: unknown key, bad value, missing file."""


@dataclass
class ModelSection:
    preset: str = "tiny"  # a name from pe_lightning.models.PRESETS (Meta's names, or `tiny`)
    vision: dict[str, Any] = field(default_factory=dict)  # overrides of VisionConfig fields
    text: dict[str, Any] = field(default_factory=dict)  # overrides of TextConfig fields
    compile: bool = False  # torch.compile the vision and text towers (GPU runs)


@dataclass
class PhaseSection:
    # The phase ends at this many samples seen; null (or None) on the last phase: at train.total_samples.
    until_samples: Optional[int] = "???"  # type: ignore[assignment]
    resolution: int = "???"  # type: ignore[assignment]
    batch_size: int = "???"  # type: ignore[assignment]


@dataclass
class OptimSection:
    name: str = "lamb"  # lamb (PE) | adamw (vanilla CLIP)
    lr: float = 2e-3  # PE: LAMB 2e-3 (AdamW baseline 5e-4)
    weight_decay: float = 0.05  # not published: our choice
    beta1: float = 0.9  # not published: our choice
    beta2: float = 0.95
    eps: float = 1e-6
    warmup_samples: int = 2000  # not published: our choice
    # lr of the no-decay group (biases, norms, embeddings, learned tokens, the temperature) = lr x this. Not
    # published: our choice. Under LAMB that group takes plain Adam steps (no trust ratio, timm's and NVLAMB's
    # always_adapt=False), so LAMB's lr, a step size relative to each weight's norm, is there an absolute one.
    no_decay_lr_scale: float = 1.0
    # LAMB: the trust ratio for the no-decay group too (timm's `always_adapt`). Not published: our choice.
    lamb_always_adapt: bool = False
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clip (LAMB clips inside its step; 0 = off)
    compile: bool = True  # LAMB: our FusedLamb, its update compiled (~10 s once; 3x faster steps on CPU and GPU,
    #                       falls back to eager without a C++ compiler); false: timm's eager Lamb, same math


@dataclass
class TrainSection:
    total_samples: int = 100_000
    batch_size: int = 64  # used when `phases` is empty
    phases: list[PhaseSection] = field(default_factory=list)  # progressive resolution / batch schedule
    log_every_n_steps: int = 10


@dataclass
class EvalSetSection:
    name: str = "???"
    path: str = "???"  # a CLIP_benchmark-layout folder (zero-shot) or image-caption shards (retrieval)
    heldout_classes: Optional[str] = None  # file of class names held out of training


@dataclass
class EvalSection:
    """The evaluation *sets* (data, shared by every stage's eval callbacks and the probes; set by the data
    preset). When and how a callback evaluates are that callback's own arguments."""

    batch_size: int = 256
    factor_names: list[str] = field(default_factory=list)  # e.g. [colour, shape] for two-word classes
    zeroshot: list[EvalSetSection] = field(default_factory=list)
    retrieval: list[EvalSetSection] = field(default_factory=list)


@dataclass
class TrainerSection:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    accumulate_grad_batches: int = 1  # note: accumulation does not add contrastive negatives
    checkpoint_every_n_steps: int = 50
    progress_bar: bool = True
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default


@dataclass
class CallbackSection:
    name: str = "???"  # registered short name (callbacks/<name>.py) or path/to/file.py:ClassName
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeConfig:
    stage: str = "pretrain"
    run: str = "default"
    runs_dir: str = "runs"
    seed: int = 0
    init: Optional[str] = None  # start from these weights (a parent export or a released Meta file)
    resume: str = "auto"  # auto: resume if last.ckpt exists | force: resume even if the config changed | never
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    callbacks: list[CallbackSection] = field(default_factory=list)  # each stage recipe lists its own


# Shorthands accepted on the command line: `model=PE-Core-B16-224` means `model.preset=PE-Core-B16-224`.
SHORTHANDS = {"model": "model.preset", "data": "data.preset"}


def split_words(args: list[str], *names: str) -> tuple[dict[str, str], list[str]]:
    """Take the command's own `name=value` words (for `names`) out of an argument list; the rest stay
    recipe overrides."""
    taken, rest = {}, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in names:
            taken[key] = value
        else:
            rest.append(arg)
    return taken, rest


def parse_overrides(args: list[str]) -> list[str]:
    """Turn `key=value` words into OmegaConf dotlist entries, expanding shorthands."""
    dotlist = []
    for arg in args:
        if "=" not in arg:
            raise RecipeError(f"expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        dotlist.append(f"{SHORTHANDS.get(key, key)}={_python_none_as_null(key, value)}")
    return dotlist


def _python_none_as_null(key: str, value: str) -> str:
    """`until_samples: None` (the phase schedule's Python spelling, PhaseSchedule's docs) as YAML's null, which
    OmegaConf reads as None; YAML itself reads `None` as a string."""
    if key.endswith("until_samples"):
        return "null" if value.strip() == "None" else value
    return re.sub(r"(until_samples\s*:\s*)None\b", r"\1null", value)


def _yaml_layer(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except (OSError, OmegaConfBaseException) as err:
        raise RecipeError(f"cannot read recipe file {path}: {err}") from err


def _peek(layers: list[DictConfig], key: str, default: str) -> str:
    """The value of `key` in the last layer that sets it (to pick the model/data preset files)."""
    value = default
    for layer in layers:
        found = OmegaConf.select(layer, key, default=None)
        if found is not None:
            value = str(found)
    return value


def _merge(schema: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except ConfigKeyError as err:
        raise RecipeError(f"{source}: unknown recipe key {err.full_key!r} ({err.msg.splitlines()[0]}). "
                          "Check the spelling against recipes/base.yaml.") from err
    except OmegaConfBaseException as err:
        raise RecipeError(f"{source}: bad value for {getattr(err, 'full_key', '?')!r}: {err.msg}") from err


def recipe_schema(stage: str, args: Optional[type]) -> DictConfig:
    """The typed schema of a stage's recipe: the shared sections plus `<stage>: Args` (the stage's own keys)."""
    if args is None:
        return OmegaConf.structured(RecipeConfig)
    schema = make_dataclass(f"{stage.title()}Recipe", [(stage, args, field(default_factory=args))],
                            bases=(RecipeConfig,))
    return OmegaConf.structured(schema)


def load_recipe(stage: str, overrides: list[str] | None = None, recipes_dir: Path = RECIPES_DIR,
                recipe: str | None = None, args: Optional[type] = None) -> DictConfig:
    """Merge the recipe layers for `stage` and validate every key. Returns a typed DictConfig.

    `recipe` names a variant stage file (e.g. `pretrain_vanilla`); by default it is the stage's own file.
    `args` is the stage's `Args` dataclass (its keys live under `<stage>:`); the stage registry passes it
    (`pe_lightning.stages.load_stage_recipe`).
    """
    cli = OmegaConf.from_dotlist(parse_overrides(overrides or []))
    stage_file = recipes_dir / f"{recipe or stage}.yaml"
    if not stage_file.exists():
        known = sorted(p.stem for p in recipes_dir.glob("*.yaml") if p.name not in NOT_STAGE_FILES)
        raise RecipeError(f"no recipe file {stage_file} for stage {stage!r}; recipe files: {known}")
    base = _yaml_layer(recipes_dir / "base.yaml")
    stage_layer = _yaml_layer(stage_file)
    model_name = _peek([base, stage_layer, cli], "model.preset", "tiny")
    data_name = _peek([base, stage_layer, cli], "data.preset", "shapes")
    layers = [("recipes/base.yaml", base)]
    scale_file = recipes_dir / stage / f"{model_name}.yaml"  # the stage's scale for the model, merged last
    if not scale_file.exists():  # a preset made to run at another's scale (presets.SCALE_OF: tiny-deep -> tiny)
        from pe_lightning.models.presets import SCALE_OF

        scale_file = recipes_dir / stage / f"{SCALE_OF.get(model_name, model_name)}.yaml"
    for path in (recipes_dir / "models" / f"{model_name}.yaml", recipes_dir / "data" / f"{data_name}.yaml",
                 scale_file):
        if path.exists():
            layers.append((str(path.relative_to(recipes_dir.parent)), _yaml_layer(path)))
    if recipe in (None, stage) and scale_file.exists():
        _refuse_dead_scale_keys(layers[-1][1], stage_layer, layers[-1][0], f"recipes/{stage_file.name}")
    layers += [(f"recipes/{stage_file.name}", stage_layer), ("command line", cli)]
    cfg = recipe_schema(stage, args)
    for source, layer in layers:
        cfg = _merge(cfg, layer, source)
    cfg.stage = stage
    _validate_model_overrides(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RecipeError(f"recipe keys without a value: {missing}")
    return cfg


def _refuse_dead_scale_keys(scale: DictConfig, method: DictConfig, scale_name: str, method_name: str) -> None:
    """The stage's method file merges after its scale layer (so a variant method file can replace the scale's
    choices on purpose); a key that both the stage's own files set is dead in the scale layer: an error, not
    a silently ignored setting."""
    both = sorted(_flatten(OmegaConf.to_container(scale, resolve=False)).keys()
                  & _flatten(OmegaConf.to_container(method, resolve=False)).keys())
    if both:
        raise RecipeError(f"{scale_name} sets {both}, which {method_name} also sets; the method file merges later, "
                          f"so the scale layer's value would be ignored. Set each key in one of the two files")


def _validate_model_overrides(cfg: DictConfig) -> None:
    """Model overrides are free-form dicts in the schema; check them against the preset dataclasses.
    (Schedules are checked by the stage when it is built, before anything is written.)"""
    from pe_lightning.models.presets import get_preset

    try:
        get_preset(cfg.model.preset, vision=dict(cfg.model.vision), text=dict(cfg.model.text))
    except (ValueError, TypeError) as err:
        raise RecipeError(f"model section: {err}") from err


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def result_keys(cfg: DictConfig) -> dict[str, Any]:
    """The flattened keys whose change alters a run's result (all but bookkeeping, logging and the compile
    switches, which change speed, not the math: a run may resume with them flipped). The settings of a switched
    off feature (`<section>.enabled: false`) are inert, so they are left out too: only `enabled` counts."""
    cosmetic = ("run", "runs_dir", "resume", "trainer.progress_bar", "trainer.checkpoint_every_n_steps",
                "trainer.threads", "train.log_every_n_steps", "eval.", "callbacks", "model.compile",
                "optim.compile")
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    flat = {k: v for k, v in flat.items() if not any(k == c or k.startswith(c) for c in cosmetic)}
    off = tuple(k[: -len("enabled")] for k, v in flat.items() if k.endswith(".enabled") and v is False)
    return {k: v for k, v in flat.items() if k.endswith(".enabled") or not k.startswith(off)}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b.c": leaf value} (lists are leaves; an empty mapping sets nothing)."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat

