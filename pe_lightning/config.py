"""The recipe: a typed schema, merged from YAML layers and command-line overrides.

Layers, later wins: schema defaults -> recipes/base.yaml -> recipes/models/<model>.yaml (if present)
-> recipes/data/<data>.yaml (if present) -> recipes/<stage>.yaml -> `key=value` overrides.
Every key is checked against the schema when the recipe is loaded, so a typo fails at once with its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pe_lightning.data.config import DataConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be loaded: unknown key, bad value, missing file."""


@dataclass
class ModelSection:
    preset: str = "tiny"  # a name from pe_lightning.models.PRESETS (Meta's names, or `tiny`)
    vision: dict[str, Any] = field(default_factory=dict)  # overrides of VisionConfig fields
    text: dict[str, Any] = field(default_factory=dict)  # overrides of TextConfig fields
    compile: bool = False  # torch.compile the vision and text towers (GPU runs)


@dataclass
class PhaseSection:
    until_samples: int = "???"  # type: ignore[assignment]  # the phase ends at this many samples seen
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
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clip (LAMB clips inside its step; 0 = off)
    compile: bool = True  # LAMB: our FusedLamb, its update compiled (~10 s once; 3x faster steps on CPU and GPU,
    #                       falls back to eager without a C++ compiler); false: timm's eager Lamb, same math


@dataclass
class MaskRegSection:
    """MaskFeat-style mask regularization (PE_REFERENCE.md s.6)."""

    enabled: bool = True
    batch_fraction: float = 0.0625  # 1/16 of the batch gets a masked copy
    mask_ratio: float = 0.75  # of its patches replaced by the mask token
    weight: float = 1.0  # not published: our choice


@dataclass
class TrainSection:
    total_samples: int = 100_000
    batch_size: int = 64  # used when `phases` is empty
    phases: list[PhaseSection] = field(default_factory=list)  # progressive resolution / batch schedule
    max_logit_scale: float = 100.0  # CLIP's clamp of the temperature
    log_every_n_steps: int = 10


@dataclass
class EvalSetSection:
    name: str = "???"
    path: str = "???"  # a CLIP_benchmark-layout folder (zero-shot) or image-caption shards (retrieval)
    heldout_classes: Optional[str] = None  # file of class names held out of training


@dataclass
class EvalSection:
    every_n_steps: int = 0  # 0: only at the end of the stage
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
    mask_reg: MaskRegSection = field(default_factory=MaskRegSection)
    eval: EvalSection = field(default_factory=EvalSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    callbacks: list[CallbackSection] = field(default_factory=list)
    stage_args: dict[str, Any] = field(default_factory=dict)  # stage-specific keys (see each stage file)


# Shorthands accepted on the command line: `model=PE-Core-B16-224` means `model.preset=PE-Core-B16-224`.
SHORTHANDS = {"model": "model.preset", "data": "data.preset"}


def parse_overrides(args: list[str]) -> list[str]:
    """Turn `key=value` words into OmegaConf dotlist entries, expanding shorthands."""
    dotlist = []
    for arg in args:
        if "=" not in arg:
            raise RecipeError(f"expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        dotlist.append(f"{SHORTHANDS.get(key, key)}={value}")
    return dotlist


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


def load_recipe(stage: str, overrides: list[str] | None = None, recipes_dir: Path = RECIPES_DIR,
                recipe: str | None = None) -> DictConfig:
    """Merge the recipe layers for `stage` and validate every key. Returns a typed DictConfig.

    `recipe` names a variant stage file (e.g. `pretrain_vanilla`); by default it is the stage's own file.
    """
    cli = OmegaConf.from_dotlist(parse_overrides(overrides or []))
    stage_file = recipes_dir / f"{recipe or stage}.yaml"
    if not stage_file.exists():
        known = sorted(p.stem for p in recipes_dir.glob("*.yaml") if p.stem not in ("base", "pipeline"))
        raise RecipeError(f"no recipe file {stage_file} for stage {stage!r}; recipe files: {known}")
    base = _yaml_layer(recipes_dir / "base.yaml")
    stage_layer = _yaml_layer(stage_file)
    model_name = _peek([base, stage_layer, cli], "model.preset", "tiny")
    data_name = _peek([base, stage_layer, cli], "data.preset", "shapes")
    layers = [("recipes/base.yaml", base)]
    for path in (recipes_dir / "models" / f"{model_name}.yaml", recipes_dir / "data" / f"{data_name}.yaml"):
        if path.exists():
            layers.append((str(path.relative_to(recipes_dir.parent)), _yaml_layer(path)))
    layers += [(f"recipes/{stage_file.name}", stage_layer), ("command line", cli)]
    cfg = OmegaConf.structured(RecipeConfig)
    for source, layer in layers:
        cfg = _merge(cfg, layer, source)
    cfg.stage = stage
    _validate_model_overrides(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RecipeError(f"recipe keys without a value: {missing}")
    return cfg


def _validate_model_overrides(cfg: DictConfig) -> None:
    """Model overrides are free-form dicts in the schema; check them against the preset dataclasses.
    Then check the schedules, which need the model's patch size, so bad values fail before any work."""
    from pe_lightning.models.presets import get_preset
    from pe_lightning.stages.optim import WarmupCosine
    from pe_lightning.stages.phases import PhaseSchedule

    try:
        preset = get_preset(cfg.model.preset, vision=dict(cfg.model.vision), text=dict(cfg.model.text))
    except (ValueError, TypeError) as err:
        raise RecipeError(f"model section: {err}") from err
    train = cfg.train
    phases = [(p.until_samples, p.resolution, p.batch_size) for p in train.phases] or [
        (train.total_samples, cfg.data.image_size, train.batch_size)]
    try:
        PhaseSchedule(phases, train.total_samples, patch_size=preset.vision.patch_size,
                      chunk_size=cfg.data.chunk_size)
        WarmupCosine(cfg.optim.lr, cfg.optim.warmup_samples, train.total_samples, cfg.optim.min_lr_ratio)
    except ValueError as err:
        raise RecipeError(f"train/optim schedule: {err}") from err
    too_large = [p[1] for p in phases if p[1] > cfg.data.image_size]
    if too_large:
        raise RecipeError(f"train.phases resolution {too_large[0]} exceeds data.image_size "
                          f"{cfg.data.image_size}: the loader emits data.image_size; raise it")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def result_keys(cfg: DictConfig) -> dict[str, Any]:
    """The flattened keys whose change alters a run's result (all but bookkeeping, logging and the compile
    switches, which change speed, not the math: a run may resume with them flipped)."""
    cosmetic = ("run", "runs_dir", "resume", "trainer.progress_bar", "trainer.checkpoint_every_n_steps",
                "trainer.threads", "train.log_every_n_steps", "eval.", "callbacks", "model.compile",
                "optim.compile")
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {k: v for k, v in flat.items() if not any(k == c or k.startswith(c) for c in cosmetic)}

