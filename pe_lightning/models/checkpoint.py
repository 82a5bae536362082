"""Checkpoint formats: load Meta / ours / open_clip / timm weights (format detected from the keys) and export
Meta's layout atomically.

Formats (PE_REFERENCE.md section 5):
* ``meta``: Meta's `PE-*.pt` files and our exports. Dict, maybe wrapped under `state_dict` / `weights`, keys
  maybe prefixed `module.`; vision keys under `visual.` (CLIP files) or bare (vision-only Lang/Spatial files),
  text keys and `logit_scale` at top level. Ours may add `visual.stem.*` (tiny's conv stem, instead of
  `visual.conv1.weight`) and `visual.mask_token` (only when exported with `include_mask_token=True`).
  By default a model's learned mask token goes to a **side file** instead, `<weights stem>.mask_token.pt`
  beside the weights (`{"mask_token": [W] tensor}`, see `mask_token_path`): Meta's `load_ckpt`
  (strict=False) would only log an extra `visual.mask_token`, but timm's and open_clip's converters load
  strictly and would refuse it, so model.pt keeps exactly Meta's keys and the side file carries the token to
  the next stage (PE-Spatial's student starts from its parent's token: spatial.mask_token=parent).
* ``open_clip``: `visual.trunk.*` = timm's Eva keys, `text.*` = Meta's text keys, `logit_scale`.
* ``timm``: a bare `vit_pe_*` state dict (vision only).

The timm -> Meta mapping below is the inverse of timm's own `_convert_pe` (timm/models/eva.py).

Loading is strict: missing keys, unexpected keys and shape mismatches raise `CheckpointError` naming the
first few of each with counts and the preset. Explicit, reported exceptions:
* fixed buffers (`rope.*` frequencies, `attn_mask`) in a file are dropped;
* a missing `mask_token` keeps the model's initial value (Meta's files have none), unless a side file
  `<stem>.mask_token.pt` lies beside a weights path: then the model's token is loaded from it; a model without
  a mask token keeps the side file's token as `visual.carried_mask_token` (a plain attribute, in no state
  dict) so that its own export writes it on (a stage that never masks passes its parent's token through;
  a resumed stage builds its model without loading the parent, so its export then has no side file);
* a vision-only target (a `VisionTransformer`, or a vision-only `PECLIP`) drops a file's text keys;
* a truncated tower (`cfg.truncated_from` set: `truncate(k)` or the PE-Lang presets) drops the file's
  blocks >= k and its `ln_post` / `attn_pool` / `proj` when the model has none.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from pe_lightning.errors import UserError
from pe_lightning.io import torch_save_atomic

from .clip import PECLIP
from .vision import VisionTransformer, resample_posemb

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
Source = Union[str, os.PathLike, Mapping[str, Any]]

_WRAPPERS = ("state_dict", "weights", "model", "module")
_SHOW = 5  # keys named per category in an error


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not match the model."""


@dataclass
class LoadReport:
    format: str
    source: str
    loaded: int = 0
    dropped: List[str] = field(default_factory=list)  # file keys dropped on purpose (see module doc)
    kept_at_init: List[str] = field(default_factory=list)  # model keys absent from the file, kept (mask_token)
    mask_token_file: Optional[str] = None  # the side file the mask token came from (loaded or carried)
    resized: List[str] = field(default_factory=list)  # keys resampled to the model's grid
    missing: List[str] = field(default_factory=list)  # only non-empty with strict=False
    unexpected: List[str] = field(default_factory=list)  # only non-empty with strict=False


# ----------------------------------------------------------------------------------------------------------
# reading

def _unwrap_module(model: nn.Module) -> nn.Module:
    for _ in range(4):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile wrapper
            model = model._orig_mod
        else:
            break
    return model


def _strip_key(k: str) -> str:
    while k.startswith("module."):
        k = k[len("module."):]
    return k.replace("_orig_mod.", "")


def read_state_dict(src: Source) -> Tuple[StateDict, str]:
    """(flat tensor dict with wrappers and `module.` / `_orig_mod.` prefixes removed, description)."""
    if isinstance(src, Mapping):
        obj: Any = src
        where = "<state dict>"
    else:
        path = Path(src)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                obj = load_file(str(path), device="cpu")
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated, not a torch file, pickled objects
            raise CheckpointError(f"cannot read checkpoint {path}: {_load_failure(e)}") from None
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {where} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {where} holds non-tensor entries {bad[:_SHOW]}: not a state dict")
    return {_strip_key(str(k)): v for k, v in obj.items()}, where


def _load_failure(error: Exception) -> str:
    """One short line for a file torch cannot load (torch's own message is several lines of pickle advice)."""
    text = str(error)
    if "Unsupported global" in text:  # a real pickle naming a class; random bytes fail on an opcode instead
        return ("it holds pickled Python objects, not only tensors; load it in Python and save its state_dict "
                "with torch.save")
    return ("not a PyTorch checkpoint (truncated or corrupt?); give a weights file saved by torch.save (a stage's "
            "export/model.pt or a released Meta PE-*.pt)")


def detect_format(sd: Mapping[str, Any]) -> str:
    """'open_clip' | 'timm' | 'meta' (Meta's files and ours) from the keys."""
    keys = list(sd)
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open_clip"
    if "patch_embed.proj.weight" in sd or "pos_embed" in sd or any(k.startswith("blocks.") for k in keys):
        return "timm"
    meta_markers = ("conv1.weight", "class_embedding", "positional_embedding", "token_embedding.weight",
                    "ln_pre.weight", "stem.0.weight")
    if any(k.startswith("visual.") for k in keys) or any(m in sd for m in meta_markers) \
            or any(k.startswith("transformer.resblocks.") for k in keys):
        return "meta"
    raise CheckpointError(f"unrecognised checkpoint format; first keys: {keys[:_SHOW]}")


# ----------------------------------------------------------------------------------------------------------
# timm -> Meta (inverse of timm.models.eva._convert_pe)

_BLOCK_SUBS = (
    ("norm1.", "ln_1."),
    ("norm2.", "ln_2."),
    ("attn.qkv.weight", "attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.", "attn.out_proj."),
    ("gamma_1", "ls_1.gamma"),
    ("gamma_2", "ls_2.gamma"),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
_POOL_SUBS = (
    ("attn_pool.latent", "attn_pool.probe"),
    ("attn_pool.proj.", "attn_pool.attn.out_proj."),
    ("attn_pool.norm.", "attn_pool.layernorm."),
    ("attn_pool.mlp.fc1.", "attn_pool.mlp.c_fc."),
    ("attn_pool.mlp.fc2.", "attn_pool.mlp.c_proj."),
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.*)$")


def timm_to_meta_vision(sd: Mapping[str, torch.Tensor], where: str = "<state dict>") -> Tuple[StateDict, List[str]]:
    """A timm `vit_pe_*` state dict -> Meta's vision keys (bare). Returns (dict, dropped keys).
    Keys timm has and PE does not (e.g. `fc_norm.*`) pass through unchanged and fail the strict check."""
    out: StateDict = {}
    dropped: List[str] = []
    sd = dict(sd)
    # fused attention-pool q + kv -> in_proj
    for kind in ("weight", "bias"):
        q, kv = sd.pop(f"attn_pool.q.{kind}", None), sd.pop(f"attn_pool.kv.{kind}", None)
        if q is not None and kv is not None:
            out[f"attn_pool.attn.in_proj_{kind}"] = torch.cat([q, kv], dim=0)
        elif q is not None or kv is not None:
            raise CheckpointError(f"checkpoint {where}: attn_pool.q.{kind} and attn_pool.kv.{kind} come in pairs")
    for k, v in sd.items():
        if k.startswith("rope."):
            dropped.append(k)
            continue
        m = _BLOCK_RE.match(k)
        if m:
            i, sub = m.groups()
            if sub in ("attn.q_bias", "attn.v_bias", "attn.k_bias"):
                continue  # handled below
            for a, b in _BLOCK_SUBS:
                if sub.startswith(a):
                    sub = b + sub[len(a):]
                    break
            out[f"transformer.resblocks.{i}.{sub}"] = v
            continue
        if k == "patch_embed.proj.weight":
            out["conv1.weight"] = v
        elif k == "cls_token":
            out["class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["positional_embedding"] = v.reshape(-1, v.shape[-1])
        elif k.startswith("norm_pre."):
            out["ln_pre." + k[len("norm_pre."):]] = v
        elif k.startswith("norm."):
            out["ln_post." + k[len("norm."):]] = v
        elif k.startswith("attn_pool."):
            for a, b in _POOL_SUBS:
                if k.startswith(a):
                    k = b + k[len(a):]
                    break
            out[k] = v
        elif k == "head.weight":
            out["proj"] = v.t().contiguous()
        elif k == "head.bias":
            if torch.count_nonzero(v).item():
                raise CheckpointError(
                    f"checkpoint {where}: head.bias is non-zero ({v.abs().max().item():.3g}); PE's `proj` has no "
                    f"bias, so these weights cannot be represented")
            dropped.append(k)
        else:
            out[k] = v  # unknown: reported as unexpected by the strict check
    # EVA-style split q/v biases (no k bias)
    for k in [k for k in sd if k.endswith("attn.q_bias")]:
        i = _BLOCK_RE.match(k).group(1)
        q, v_ = sd[k], sd.get(f"blocks.{i}.attn.v_bias")
        if v_ is None:
            raise CheckpointError(f"checkpoint {where}: {k} without blocks.{i}.attn.v_bias")
        out[f"transformer.resblocks.{i}.attn.in_proj_bias"] = torch.cat([q, torch.zeros_like(q), v_])
    return out, dropped


# ----------------------------------------------------------------------------------------------------------
# canonical split: (vision keys bare, text keys incl. logit_scale, foreign keys)

def split_checkpoint(sd: StateDict, fmt: str, where: str) -> Tuple[StateDict, StateDict, StateDict, List[str]]:
    vision: StateDict = {}
    text: StateDict = {}
    foreign: StateDict = {}  # keys of the file that have no place in PE (reported as unexpected, original name)
    dropped: List[str] = []
    if fmt == "timm":
        vision, dropped = timm_to_meta_vision(sd, where)
    elif fmt == "open_clip":
        trunk = {k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
        vision, d = timm_to_meta_vision(trunk, where)
        dropped += ["visual.trunk." + k for k in d]
        for k, v in sd.items():
            if k.startswith("visual.trunk."):
                continue
            if k.startswith("text."):
                text[k[len("text."):]] = v
            elif k == "logit_scale":
                text[k] = v
            else:
                foreign[k] = v  # e.g. visual.head.proj.weight (timm_proj), logit_bias (SigLIP)
    else:  # meta / ours
        if any(k.startswith("visual.") for k in sd):
            for k, v in sd.items():
                if k.startswith("visual."):
                    vision[k[len("visual."):]] = v
                else:
                    text[k] = v
        elif "token_embedding.weight" in sd:
            text = dict(sd)
        else:  # vision-only file with bare keys (PE-Lang / PE-Spatial)
            vision = dict(sd)
    for d, prefix in ((vision, "visual."), (text, "")):
        for k in [k for k in d if k.startswith("rope.") or ".rope." in k or k.endswith("attn_mask")]:
            del d[k]
            dropped.append(prefix + k)
    return vision, text, foreign, dropped


# ----------------------------------------------------------------------------------------------------------
# loading

def _describe(keys: List[str]) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"{len(keys)} [{', '.join(keys[:_SHOW])}{more}]"


def load_checkpoint(model: nn.Module, src: Source, *, strict: bool = True,
                    resize_pos_embed: bool = False) -> LoadReport:
    """Load `src` (path or state dict; Meta / ours / open_clip / timm) into a `PECLIP` or `VisionTransformer`.

    strict: any missing key, unexpected key or shape mismatch raises `CheckpointError` (with strict=False
    they are skipped and listed in the report). resize_pos_embed: resample a posemb stored at another grid
    to the model's (Meta's bilinear rule) instead of failing.
    """
    model = _unwrap_module(model)
    if isinstance(model, PECLIP):
        visual, has_text, prefix = _unwrap_module(model.visual), not model.vision_only, "visual."
    elif isinstance(model, VisionTransformer):
        visual, has_text, prefix = model, False, ""
    else:
        raise TypeError(f"load_checkpoint takes a PECLIP or VisionTransformer, got {type(model).__name__}")
    preset = getattr(model, "preset_name", "custom")

    raw, where = read_state_dict(src)
    fmt = detect_format(raw)
    vision, text, foreign, dropped = split_checkpoint(raw, fmt, where)
    report = LoadReport(format=fmt, source=where, dropped=dropped)

    # a truncated tower: drop the cut blocks and the head explicitly
    if visual.cfg.truncated_from is not None:
        depth = visual.layers
        absent = [name for name, mod in (("ln_post.", visual.ln_post), ("attn_pool.", visual.attn_pool)) if mod is None]
        for k in list(vision):
            m = re.match(r"^transformer\.resblocks\.(\d+)\.", k)
            cut = m is not None and int(m.group(1)) >= depth
            head = any(k.startswith(a) for a in absent) or (k == "proj" and visual.proj is None)
            if cut or head:
                del vision[k]
                report.dropped.append(prefix + k)
    if not has_text and text:
        report.dropped += sorted(text)
        text = {}

    provided: StateDict = {prefix + k: v for k, v in vision.items()}
    provided.update(text)
    actual_names = {_strip_key(k): k for k in model.state_dict()}  # compiled submodules add `_orig_mod.`
    expected = {_strip_key(k): v for k, v in model.state_dict().items()}

    if resize_pos_embed:
        k = prefix + "positional_embedding"
        if k in provided and k in expected and provided[k].shape != expected[k].shape:
            npt = visual.num_prefix_tokens
            n_old = provided[k].shape[0] - npt
            if provided[k].ndim == 2 and provided[k].shape[1] == expected[k].shape[1] and n_old > 0:
                provided[k] = resample_posemb(provided[k].float(), npt, (visual.posemb_grid,) * 2).to(provided[k].dtype)
                report.resized.append(k)

    side = read_mask_token(src) if isinstance(src, (str, os.PathLike)) else None
    if side is not None and prefix + "mask_token" in expected and prefix + "mask_token" not in provided:
        provided[prefix + "mask_token"] = side
        report.mask_token_file = str(mask_token_path(src))
    elif side is not None and getattr(visual, "mask_token", None) is None:
        if side.shape == (visual.width,):
            visual.carried_mask_token = side.clone()
            report.mask_token_file = str(mask_token_path(src))
    missing = [k for k in expected if k not in provided]
    for k in list(missing):
        if k == prefix + "mask_token":  # Meta's files have none: keep the model's initial value
            missing.remove(k)
            report.kept_at_init.append(k)
    unexpected = [k for k in provided if k not in expected] + list(foreign)
    mismatched = [f"{k}: file {tuple(provided[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in provided if k in expected and provided[k].shape != expected[k].shape]

    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"missing keys {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_describe(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_describe(mismatched)}")
        hints = []
        if missing and not vision:
            hints.append("the file holds no vision weights")
        if missing and has_text and not text:
            hints.append("the file is vision-only (PE-Lang / PE-Spatial / timm): load it into model.visual or "
                         "build the model with text=None")
        if any("positional_embedding" in m for m in mismatched):
            hints.append("the posemb grid differs: pass resize_pos_embed=True to resample it")
        if any(".ls_1.gamma" in k or ".ls_2.gamma" in k for k in missing + unexpected):
            hints.append("LayerScale differs: call model.visual.set_layer_scale() before loading, or build the "
                         "model with the file's ls_init_value")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise CheckpointError(f"checkpoint {where} (format {fmt}) does not match model {preset!r}: "
                              f"{'; '.join(parts)}{hint}")

    to_load = {actual_names[k]: v for k, v in provided.items() if k in expected and v.shape == expected[k].shape}
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report.loaded = len(to_load)
    report.missing = sorted(missing)
    report.unexpected = sorted(unexpected) + [m.split(":")[0] for m in mismatched]
    if report.dropped:
        log.info("checkpoint %s: dropped %s", where, _describe(report.dropped))
    if report.kept_at_init:
        log.info("checkpoint %s: kept at init %s", where, report.kept_at_init)
    if report.resized:
        log.info("checkpoint %s: resampled %s to the model's grid", where, report.resized)
    if report.mask_token_file:
        log.info("checkpoint %s: mask token from %s", where, report.mask_token_file)
    return report


MASK_TOKEN_SUFFIX = ".mask_token.pt"


def mask_token_path(weights: Union[str, os.PathLike]) -> Path:
    """The mask token's side file of a weights file: `model.pt` -> `model.mask_token.pt` (module docstring)."""
    weights = Path(weights)
    return weights.with_name(weights.stem + MASK_TOKEN_SUFFIX)


def read_mask_token(weights: Union[str, os.PathLike]) -> Optional[torch.Tensor]:
    """The `[W]` mask token of the side file beside `weights`, or None when there is none."""
    path = mask_token_path(weights)
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        token = blob["mask_token"]
    except Exception as e:
        raise CheckpointError(f"mask-token side file {path} is unreadable ({type(e).__name__}: {e}); delete it "
                              "or re-export its weights") from None
    if not isinstance(token, torch.Tensor) or token.ndim != 1:
        raise CheckpointError(f"mask-token side file {path} holds no [width] tensor under 'mask_token'")
    return token


def _mask_token_to_carry(model: nn.Module) -> Optional[torch.Tensor]:
    """The model's own learned mask token, else the one it carries from its parent's side file, else None."""
    model = _unwrap_module(model)
    visual = _unwrap_module(model.visual) if isinstance(model, PECLIP) else model
    token = getattr(visual, "mask_token", None)
    if token is None:
        token = getattr(visual, "carried_mask_token", None)
    return None if token is None else token.detach().cpu().float().contiguous().clone()


# ----------------------------------------------------------------------------------------------------------
# export

def to_meta_state_dict(model: nn.Module, *, include_mask_token: bool = False,
                       vision_only: Optional[bool] = None) -> StateDict:
    """Meta's layout: vision under `visual.`, text + `logit_scale` at top level (absent for a vision-only
    model, a `VisionTransformer`, or vision_only=True). `mask_token` only with include_mask_token=True."""
    model = _unwrap_module(model)
    if isinstance(model, PECLIP):
        visual = _unwrap_module(model.visual)
        with_text = not model.vision_only and not vision_only
    elif isinstance(model, VisionTransformer):
        visual, with_text = model, False
    else:
        raise TypeError(f"export takes a PECLIP or VisionTransformer, got {type(model).__name__}")
    out: StateDict = {}
    for k, v in visual.state_dict().items():
        if k == "mask_token" and not include_mask_token:
            continue
        out["visual." + k] = v.detach().cpu().contiguous()
    if with_text:
        for k, v in model.state_dict().items():
            if not k.startswith("visual."):
                out[_strip_key(k)] = v.detach().cpu().contiguous()
    return out


def save_state_dict_atomic(sd: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> Path:
    """torch.save to a temporary file in the same directory, fsync, os.replace: readers never see a partial file."""
    return torch_save_atomic(dict(sd), path)


def export_checkpoint(model: nn.Module, path: Union[str, os.PathLike], *, include_mask_token: bool = False,
                      vision_only: Optional[bool] = None, mask_token_file: bool = True) -> Path:
    """Write the model's weights in Meta's layout (weights only) to `path`, atomically; with mask_token_file
    (default) and without include_mask_token, the model's mask token (its own or the one it carries) goes to
    the side file `mask_token_path(path)` (module docstring), written first, so model.pt's presence still
    means the export is whole."""
    token = _mask_token_to_carry(model) if mask_token_file and not include_mask_token else None
    if token is not None:
        torch_save_atomic({"mask_token": token}, mask_token_path(path))
    return save_state_dict_atomic(
        to_meta_state_dict(model, include_mask_token=include_mask_token, vision_only=vision_only), path)
