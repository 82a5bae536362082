"""Model configurations: `VisionConfig`, `TextConfig`, `CLIPConfig` and the presets under Meta's names.

Numbers are PE_REFERENCE.md section 4. Recipe choices of ours (not Meta's) are marked "our choice".

* PE-Core-*: vision tower + text tower (CLIP), attention pooling, `ln_post`, `proj`.
* PE-Lang-* / PE-Spatial-*: **vision-only** (`text=None`), exactly like Meta's released files, which hold
  vision weights only. Such a model has no text tower, no `logit_scale`, no pooling head; its output is the
  token sequence. Pass a non-empty `text={...}` to `get_preset` to give one the text tower of the Core model
  of the same size with those fields changed (it then also needs a head: `vision=dict(pool_type='attn',
  use_ln_post=True, output_dim=...)`); `text={}` changes nothing; `text=None` makes any preset vision-only.
* PE-Lang-*: the first 47 of 50 (G) / 23 of 24 (L) blocks of the Core tower, LayerScale 0.1, marked
  `truncated_from` so a full-depth Core file can be loaded into it (the extra blocks and the head are dropped
  explicitly by the loader).
* `tiny`: our recipe preset for CPU runs and tests (64 px, patch 8 via a three-conv stem, width 128 x 4).
  `tiny-deep`: the same at width 96 x 8 blocks, about equal training FLOPs; it runs at `tiny`'s stage scales.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

POOL_TYPES = ("attn", "tok", "none")
STEMS = ("patch", "conv")


@dataclass(kw_only=True)
class VisionConfig:
    """The PE vision tower (PE_REFERENCE.md sections 1-2)."""

    image_size: int  # native (pretraining) resolution: sets the stored abs-posemb grid
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    use_cls_token: bool = True
    pool_type: str = "attn"  # 'attn' (Core) | 'tok' (class token: the vanilla-CLIP baseline) | 'none' (Lang/Spatial)
    use_ln_post: bool = True
    ls_init_value: Optional[float] = None  # None = no LayerScale parameters at all
    drop_path: float = 0.0  # one constant rate for every block
    output_dim: Optional[int] = None  # `proj` [width, output_dim]; None = no projection
    attn_pool_heads: int = 8
    attn_pool_mlp_ratio: float = 4.0
    use_rope: bool = True
    rope_theta: float = 10000.0
    use_abs_posemb: bool = True
    stem: str = "patch"  # 'patch' = Meta's conv1 patchify | 'conv' = three 3x3 stride-2 convs (patch 8 only)
    use_mask_token: bool = False  # learned `mask_token` [width] for masked inputs (our mask regularisation)
    ln_eps: float = 1e-5
    truncated_from: Optional[int] = None  # depth of the tower this one was cut from (Lang); None = not cut
    grad_checkpointing: bool = False  # activation checkpointing of every block while training

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"vision.pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
        if self.stem not in STEMS:
            raise ValueError(f"vision.stem must be one of {STEMS}, got {self.stem!r}")
        for name in ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"vision.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"vision.width {self.width} is not divisible by vision.heads {self.heads}")
        if self.use_rope and (self.width // self.heads) % 4:
            raise ValueError(f"2D RoPE needs a head_dim divisible by 4, got {self.width // self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.stem == "conv" and self.patch_size != 8:
            raise ValueError("vision.stem='conv' (three stride-2 convs) gives a stride of 8: needs patch_size=8")
        if self.pool_type == "attn" and self.width % self.attn_pool_heads:
            raise ValueError(
                f"vision.width {self.width} is not divisible by vision.attn_pool_heads {self.attn_pool_heads}")
        if not 0.0 <= float(self.drop_path) < 1.0:
            raise ValueError(f"vision.drop_path must be in [0, 1), got {self.drop_path}")
        if self.truncated_from is not None and self.truncated_from < self.layers:
            raise ValueError(f"vision.truncated_from {self.truncated_from} < vision.layers {self.layers}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        """Side of the native (stored) token grid."""
        return self.image_size // self.patch_size


@dataclass(kw_only=True)
class TextConfig:
    """OpenAI-CLIP text transformer (PE_REFERENCE.md section 3)."""

    context_length: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    output_dim: int
    vocab_size: int = 49408
    pad_id: int = 0
    ln_eps: float = 1e-5
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("context_length", "width", "layers", "heads", "mlp_dim", "output_dim", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"text.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by text.heads {self.heads}")


@dataclass(kw_only=True)
class CLIPConfig:
    """A PE model: vision tower plus (optionally) the text tower. `text=None` = vision-only."""

    vision: VisionConfig
    text: Optional[TextConfig] = None
    init_logit_scale: float = math.log(1 / 0.07)
    name: Optional[str] = None  # the preset name, for messages

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        self.validate()

    def validate(self) -> None:
        self.vision.validate()
        if self.text is not None:
            self.text.validate()
            if self.vision.output_dim is None:
                raise ValueError("a CLIP model (with a text tower) needs vision.output_dim (the `proj`)")
            if self.vision.pool_type == "none":
                raise ValueError("a CLIP model (with a text tower) needs vision.pool_type='attn' or 'tok'")
            if self.vision.pool_type == "tok" and not self.vision.use_cls_token:
                raise ValueError("vision.pool_type='tok' pools the class token; it needs use_cls_token=True")
            if self.vision.output_dim != self.text.output_dim:
                raise ValueError(
                    f"vision.output_dim {self.vision.output_dim} != text.output_dim {self.text.output_dim}")

    @property
    def vision_only(self) -> bool:
        return self.text is None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        _check_fields(CLIPConfig, d, "model")
        vision = d.pop("vision")
        text = d.pop("text", None)
        if not isinstance(vision, VisionConfig):
            _check_fields(VisionConfig, vision, "vision")
            vision = VisionConfig(**vision)
        if text is not None and not isinstance(text, TextConfig):
            _check_fields(TextConfig, text, "text")
            text = TextConfig(**text)
        return cls(vision=vision, text=text, **d)


def _check_fields(cls, d: Dict[str, Any], where: str) -> None:
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"unknown {where} field(s) {unknown}; valid fields: {sorted(valid)}")


# ----------------------------------------------------------------------------------------------------------
# Released configurations (PE_REFERENCE.md section 4)

def _text(ctx: int, width: int, layers: int, heads: int, out: int) -> TextConfig:
    return TextConfig(context_length=ctx, width=width, layers=layers, heads=heads, mlp_dim=4 * width, output_dim=out)


# text towers per size; the output dim follows the Core model of that size
_TEXT = {
    "G": _text(72, 1280, 24, 20, 1280),
    "L": _text(32, 1024, 24, 16, 1024),
    "B": _text(32, 1024, 24, 16, 1024),
    "S": _text(32, 512, 12, 8, 512),
    "T": _text(32, 512, 12, 8, 512),
}

# vision trunks per size: (patch, width, depth, heads, mlp, cls)
_TRUNK = {
    "G": dict(patch_size=14, width=1536, layers=50, heads=16, mlp_dim=8960, use_cls_token=False),
    "L": dict(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, use_cls_token=True),
    "B": dict(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072, use_cls_token=True),
    "S": dict(patch_size=16, width=384, layers=12, heads=6, mlp_dim=1536, use_cls_token=True),
    "T": dict(patch_size=16, width=192, layers=12, heads=3, mlp_dim=768, use_cls_token=True),
}

_CORE_OUT = {"G": 1280, "L": 1024, "B": 1024, "S": 512, "T": 512}


def _core(size: str, image_size: int) -> CLIPConfig:
    vision = VisionConfig(image_size=image_size, **_TRUNK[size], pool_type="attn", use_ln_post=True,
                          ls_init_value=None, output_dim=_CORE_OUT[size])
    return CLIPConfig(vision=vision, text=copy.deepcopy(_TEXT[size]))


def _tokens_only(size: str, image_size: int, ls: Optional[float], layers: Optional[int] = None) -> CLIPConfig:
    trunk = dict(_TRUNK[size])
    truncated_from = None
    if layers is not None:
        truncated_from, trunk["layers"] = trunk["layers"], layers
    vision = VisionConfig(image_size=image_size, **trunk, pool_type="none", use_ln_post=False, ls_init_value=ls,
                          output_dim=None, truncated_from=truncated_from)
    return CLIPConfig(vision=vision, text=None)


def _tiny() -> CLIPConfig:
    # Our choice, calibrated for the embedded default run (2 CPU cores, < 10 minutes, ~150 images/s at 64 px,
    # batch 128): the conv stem (3->32->64->128, stride 2 each) gives the same 8x8 grid as a patch-8 conv1 at
    # 64 px and learns shape much faster than a linear patchify at this scale; 4 blocks of width 128.
    vision = VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=2, mlp_dim=512,
                          use_cls_token=True, pool_type="attn", use_ln_post=True, output_dim=128, stem="conv")
    text = TextConfig(context_length=32, width=128, layers=2, heads=2, mlp_dim=512, output_dim=128)
    return CLIPConfig(vision=vision, text=text)


def _tiny_half() -> CLIPConfig:
    # Our choice: the embedded default's distillation student, `tiny` at half the width in both towers (4x fewer
    # FLOPs per token), same depth, grid and context, so the teacher and the student read the same batches.
    vision = VisionConfig(image_size=64, patch_size=8, width=64, layers=4, heads=1, mlp_dim=256,
                          use_cls_token=True, pool_type="attn", use_ln_post=True, output_dim=64, stem="conv")
    text = TextConfig(context_length=32, width=64, layers=2, heads=1, mlp_dim=256, output_dim=64)
    return CLIPConfig(vision=vision, text=text)


def _tiny_deep() -> CLIPConfig:
    # Our choice (#28): `tiny` made deeper and narrower at about its training FLOPs (within 5% from 64 to 128 px,
    # tests/test_tiny_deep.py), so the tower has depth for late "global decoder" blocks to form, as in PE-Core-G
    # (whose best dense layers sit well before its last). Same stem, head and text tower as `tiny`.
    cfg = _tiny()
    v = cfg.vision
    v.width, v.layers, v.heads, v.mlp_dim = 96, 8, 2, 320
    return cfg


_BUILDERS = {
    "PE-Core-G14-448": lambda: _core("G", 448),
    "PE-Core-L14-336": lambda: _core("L", 336),
    "PE-Core-B16-224": lambda: _core("B", 224),
    "PE-Core-S16-384": lambda: _core("S", 384),
    "PE-Core-T16-384": lambda: _core("T", 384),
    "PE-Lang-G14-448": lambda: _tokens_only("G", 448, ls=0.1, layers=47),
    "PE-Lang-L14-448": lambda: _tokens_only("L", 448, ls=0.1, layers=23),
    "PE-Spatial-G14-448": lambda: _tokens_only("G", 448, ls=0.1),
    "PE-Spatial-L14-448": lambda: _tokens_only("L", 448, ls=None),
    "PE-Spatial-B16-512": lambda: _tokens_only("B", 512, ls=None),
    "PE-Spatial-S16-512": lambda: _tokens_only("S", 512, ls=None),
    "PE-Spatial-T16-512": lambda: _tokens_only("T", 512, ls=None),
    "tiny": _tiny,
    "tiny-half": _tiny_half,
    "tiny-deep": _tiny_deep,
}
# A preset without stage scale files of its own (recipes/<stage>/<preset>.yaml) runs at this preset's.
SCALE_OF: Dict[str, str] = {"tiny-deep": "tiny"}

def _make(name: str) -> CLIPConfig:
    cfg = _BUILDERS[name]()
    cfg.name = name
    return cfg


PRESETS: Dict[str, CLIPConfig] = {name: _make(name) for name in _BUILDERS}


def list_presets() -> list:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> CLIPConfig:
    """A fresh `CLIPConfig` for preset `name` with `overrides` applied.

    overrides: `vision={field: value}`, `text={field: value}` (`text={}` changes nothing; `text=None` makes the
    model vision-only; a vision-only preset has no text tower to override), CLIPConfig fields (`init_logit_scale`), or flat VisionConfig fields
    (`drop_path=0.1`). Unknown names raise ValueError naming them.
    """
    if isinstance(name, CLIPConfig):
        cfg = copy.deepcopy(name)
    else:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        cfg = copy.deepcopy(PRESETS[name])
    if not overrides:
        return cfg

    vision_fields = {f.name for f in fields(VisionConfig)}
    text_fields = {f.name for f in fields(TextConfig)}
    top_fields = {"init_logit_scale", "name"}
    vision_over: Dict[str, Any] = {}
    text_over: Optional[Dict[str, Any]] = {}
    text_given = False
    for key, value in overrides.items():
        if key == "vision":
            if not isinstance(value, dict):
                raise ValueError(f"override 'vision' must be a dict of VisionConfig fields, got {type(value).__name__}")
            vision_over.update(value)
        elif key == "text":
            text_given = True
            if value is None:
                text_over = None
            elif isinstance(value, TextConfig):
                text_over = dataclasses.asdict(value)
            elif isinstance(value, dict):
                text_over = dict(value)
            else:
                raise ValueError(f"override 'text' must be a dict of TextConfig fields or None, got {value!r}")
        elif key in top_fields:
            setattr(cfg, key, value)
        elif key in vision_fields:
            vision_over[key] = value
        else:
            raise ValueError(
                f"unknown model override {key!r}; valid: vision={{...}}, text={{...}}, {sorted(top_fields)} "
                f"or a vision field {sorted(vision_fields)}")

    unknown = sorted(set(vision_over) - vision_fields)
    if unknown:
        raise ValueError(f"unknown vision field(s) {unknown}; valid fields: {sorted(vision_fields)}")
    cfg.vision = dataclasses.replace(cfg.vision, **vision_over)

    if text_given:
        if text_over is None:
            cfg.text = None
        elif not text_over:
            pass  # `text={}`: no overrides (a vision-only preset stays vision-only)
        else:
            unknown = sorted(set(text_over) - text_fields)
            if unknown:
                raise ValueError(f"unknown text field(s) {unknown}; valid fields: {sorted(text_fields)}")
            if cfg.text is None:
                raise ValueError(f"model {cfg.name!r} has no text tower to override (a vision-only preset); "
                                 "use a PE-Core preset for a CLIP model")
            cfg.text = dataclasses.replace(cfg.text, **text_over)
    cfg.validate()
    return cfg
