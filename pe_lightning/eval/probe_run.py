"""`pe-lightning probe`: per-layer frozen-feature probes of one export, and the compare plot of several.

    pe-lightning probe run=NAME [stage=S | weights=PATH model=PRESET] [layers=1,2,4] [runs_dir=runs]
                       [data_root=data/shapes] [dense_set=single|multi|DIR] [image_size=PX] [batch_size=N]
                       [device=cpu|cuda] [tb=true|false]
    pe-lightning probe compare OUT.png DIR_OR_JSON [DIR_OR_JSON ...] [normalise=true]

What it measures (protocols in pe_lightning/eval/probes.py): for every layer k (1-based, the output after k
blocks) kNN top-1 (k = 20, cosine) and linear-probe top-1 on the mean patch token, plus both on the pooled
embedding (`"head"`) of a model with a pooling head, and a dense 1x1-conv probe's mIoU on the patch tokens.
Features of all layers come from one forward pass per image and are held in memory for the three probes.

Data: a labelled set in CLIP_benchmark layout with a `train` split (the probes fit on it, their weight
decay is chosen on a part of it) and a held-out `test` split (scores). `data_root` is the shapes world
(its `zeroshot/test` set: 48 colour-shape classes, 20 train and 10 test images per class) or any such set
folder. The dense probe runs where the samples carry `.mask.png` + `.json` objects; on the shapes world
its classes are background + the 6 shapes (a colour-shape label maps to its shape), elsewhere background +
one class per label. `dense_set` picks the dense probe's set: `single` (default) the labelled set above, whose
images hold one object each (so an image's label is every object token's label); `multi` the shapes world's
dense-probe split `data_root/dense` (world version 2: 3-5 objects of distinct shapes per image, so no
image-level label fits every token); or any folder in the same layout. kNN and linear stay on the labelled set.

Outputs (in `runs/<run>/<stage>/probe/`, or `runs/<run>/probe-<weights file stem>/` for `weights=`):
`probe.json` ({"knn": [{"layer": k, "score": s}, ...], "linear": [...], "dense": [...], "head": {...},
metadata}), `probe.png` (the layer-wise figure: each task relative to its best layer) and TensorBoard
scalars `probe/<task>` (step = layer) plus the figure, under `tb/` there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from pe_lightning.config import RecipeError
from pe_lightning.data.shards import DataError
from pe_lightning.eval.probes import (HEAD, WEIGHT_DECAYS, LayerFeatures, check_layers, dense_probe_fit,
                                      extract_layer_features, has_pooling_head, knn_probe, linear_probe_fit)
from pe_lightning.eval import plots
from pe_lightning.io import write_text_atomic

log = logging.getLogger(__name__)

USAGE = __doc__.split("\n\n")[1]
IGNORE = 255  # dense target of pixels not counted
DEFAULTS = dict(k=20, temperature=0.07, val_fraction=0.2, lbfgs_iter=100, dense_iter=50,
                seed=0)  # our choices (module docstring of probes.py)


class ProbeError(RecipeError):
    """A probe command that cannot run as asked (bad argument, missing export); the message names the fix."""


# ----------------------------------------------------------------------------------------------------------
# data

def probe_set_dir(data_root: Union[str, os.PathLike]) -> Path:
    """The labelled set of `data_root`: the shapes world's `zeroshot/test`, else `data_root` itself."""
    root = Path(data_root).expanduser()
    world_set = root / "zeroshot" / "test"
    return world_set if world_set.is_dir() else root


def dense_set_dir(data_root: Union[str, os.PathLike], dense_set: Optional[str]) -> Path:
    """The dense probe's set: `single`/None -> the labelled set (probe_set_dir), `multi` -> the shapes world's
    dense-probe split (data_root/dense), anything else -> that folder."""
    if dense_set in (None, "", "single"):
        return probe_set_dir(data_root)
    if dense_set == "multi":
        folder = Path(data_root).expanduser() / "dense"
        if not (folder / "train").is_dir() or not (folder / "test").is_dir():
            raise ProbeError(f"dense_set=multi: {folder} has no train/test splits; it comes with the shapes world "
                             f"version 2 (data=shapes_v2, or `pe-lightning data shapes --version 2 --out DIR` and "
                             f"data_root=DIR), or give dense_set=single or a folder")
        return folder
    folder = Path(dense_set).expanduser()
    if not folder.is_dir():
        raise ProbeError(f"dense_set={dense_set}: no such folder; give single, multi or a set folder")
    return folder


def _has_masks(set_dir: Path, split: str) -> bool:
    """Whether the split's first sample carries a mask (`.mask.png`) and its objects (`.json`)."""
    from pe_lightning.data.classification import resolve_benchmark
    from pe_lightning.data.shapes.masks import MASK_EXT
    from pe_lightning.data.shards import iter_tar_samples

    shards, _ = resolve_benchmark(set_dir, split)
    for raw in iter_tar_samples(shards[0], lambda reason, detail: None):
        return MASK_EXT in raw and "json" in raw
    return False


def dense_classes(classnames: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """(dense class names, lookup semantic id -> dense class): the shapes world's 48 colour-shape classes map
    to background + their 6 shapes; any other set keeps background + one class per label."""
    from pe_lightning.data.shapes.scenes import CLASSES, SHAPES

    if list(classnames) == list(CLASSES):
        lut = [0] + [1 + SHAPES.index(name.split()[-1]) for name in CLASSES]
        return ["background", *SHAPES], torch.tensor(lut, dtype=torch.long)
    return ["background", *classnames], torch.arange(1 + len(classnames))


def _batches(set_dir: Path, split: str, image_size: int, batch_size: int, with_masks: bool
             ) -> tuple[Iterator[dict], list[str]]:
    """Batches {"image", "label"[, "mask" (semantic: 1 + label, 0 = background)]} of one split. The mask
    loader reads the same shards in the same order; its images are checked to be the same pixels."""
    from pe_lightning.data.classification import load_classification_set
    from pe_lightning.data.shapes.masks import load_mask_set

    loader, classnames, _ = load_classification_set(set_dir, image_size, batch_size, split=split)
    masks = load_mask_set(set_dir, image_size, batch_size, split=split) if with_masks else None

    def gen() -> Iterator[dict]:
        mask_iter = iter(masks) if masks is not None else None
        for images, labels in loader:
            batch = {"image": images, "label": labels}
            if mask_iter is not None:
                m = next(mask_iter, None)
                if m is None or m["image"].shape != images.shape or not torch.equal(m["image"], images):
                    raise DataError(f"{set_dir}/{split}: some samples lack a .mask.png or .json (the mask and "
                                    "label passes disagree); give every sample a mask, or none to skip the "
                                    "dense probe")
                batch["mask"] = m["semantic"]
            yield batch

    return gen(), classnames


def split_features(visual: Any, set_dir: Path, split: str, layers: list[int], image_size: int, batch_size: int,
                   device: torch.device, with_masks: bool) -> tuple[LayerFeatures, list[str]]:
    batches, classnames = _batches(set_dir, split, image_size, batch_size, with_masks)
    feats = extract_layer_features(visual, batches, layers, device, keep_maps=with_masks)
    if feats.labels is None:
        raise DataError(f"{set_dir}/{split}: no labelled samples")
    return feats, classnames


# ----------------------------------------------------------------------------------------------------------
# the probes of one export

def _dense_targets(masks: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    out = lut[masks.long().clamp(0, len(lut) - 1)]
    out[masks.long() >= len(lut)] = IGNORE
    return out.to(torch.uint8) if len(lut) <= IGNORE else out


def _global_probes(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                   n_cls: int, device: torch.device, cfg: dict) -> tuple[float, dict]:
    train, test = train.to(device), test.to(device)
    knn = knn_probe(train, train_y.to(device), test, test_y.to(device), k=cfg["k"], temperature=cfg["temperature"],
                    num_classes=n_cls)
    lin = linear_probe_fit(train, train_y, test, test_y, num_classes=n_cls, val_fraction=cfg["val_fraction"],
                           max_iter=cfg["lbfgs_iter"], seed=cfg["seed"])
    return knn, {"score": lin.top1, "weight_decay": lin.weight_decay}


def probe_export(model: Any, data_root: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                 layers: Optional[Sequence[int]] = None, image_size: Optional[int] = None,
                 tb_dir: Optional[Union[str, os.PathLike]] = None, *, batch_size: int = 128,
                 device: Union[str, torch.device, None] = None, label: Optional[str] = None,
                 source: Optional[str] = None, dense_set: Optional[str] = None, **protocol: Any) -> dict:
    """Run the three probes on every layer of `model` (a PECLIP or VisionTransformer) against the labelled set
    of `data_root`, write `out_dir/probe.json` and `out_dir/probe.png` (and TensorBoard under `tb_dir`), and
    return the probe.json dict. image_size: default the model's native resolution. protocol: overrides of
    DEFAULTS (k, temperature, val_fraction, lbfgs_iter, dense_iter, seed). dense_set: see dense_set_dir."""
    t_start = time.monotonic()
    unknown = sorted(set(protocol) - set(DEFAULTS))
    if unknown:
        raise ProbeError(f"unknown probe setting(s) {unknown}; valid: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **protocol}
    visual = getattr(model, "visual", model)
    try:
        layers = check_layers(layers, visual.layers)
    except ValueError as e:
        raise ProbeError(f"{e}; give layers=1,2,... within range or leave it out for all") from None
    image_size = int(image_size or visual.cfg.image_size)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    visual.to(device)
    set_dir = probe_set_dir(data_root)
    dense_dir = dense_set_dir(data_root, dense_set)
    separate = dense_dir.resolve() != set_dir.resolve()
    with_masks = _has_masks(dense_dir, "train") and _has_masks(dense_dir, "test")
    if separate and not with_masks:
        raise ProbeError(f"dense_set={dense_set}: {dense_dir} has no .mask.png masks to probe")

    t0 = time.monotonic()
    train, classnames = split_features(visual, set_dir, "train", layers, image_size, batch_size, device,
                                       with_masks and not separate)
    test, _ = split_features(visual, set_dir, "test", layers, image_size, batch_size, device,
                             with_masks and not separate)
    dense_train, dense_test, dense_names = train, test, classnames
    if separate:
        dense_train, dense_names = split_features(visual, dense_dir, "train", layers, image_size, batch_size, device,
                                                  True)
        dense_test, _ = split_features(visual, dense_dir, "test", layers, image_size, batch_size, device, True)
    seconds = {"features": time.monotonic() - t0, "knn_linear": 0.0, "dense": 0.0}
    n_cls = len(classnames)
    log.info("probe: features of %d train + %d test images%s, layers %s%s, in %.1fs", len(train), len(test),
             f" (+ {len(dense_train)} + {len(dense_test)} of the dense set {dense_dir})" if separate else "", layers,
             " + head" if HEAD in train.pooled else "", seconds["features"])

    names, lut = dense_classes(dense_names)
    if with_masks:
        train_masks, test_masks = _dense_targets(dense_train.masks, lut), _dense_targets(dense_test.masks, lut)
    result: dict[str, Any] = {"knn": [], "linear": [], "dense": [], "head": None}
    for k in layers:
        t0 = time.monotonic()
        knn, lin = _global_probes(train.pooled[k], train.labels, test.pooled[k], test.labels, n_cls, device, cfg)
        result["knn"].append({"layer": k, "score": knn})
        result["linear"].append({"layer": k, **lin})
        seconds["knn_linear"] += time.monotonic() - t0
        line = f"probe layer {k}: knn {knn:.3f} linear {lin['score']:.3f}"
        if with_masks:
            t0 = time.monotonic()
            dense = dense_probe_fit(dense_train.maps[k].to(device), train_masks.to(device),
                                    dense_test.maps[k].to(device), test_masks.to(device), len(names),
                                    max_iter=cfg["dense_iter"],
                                    ignore_index=IGNORE)
            result["dense"].append({"layer": k, "score": dense.miou, "class_iou": dense.class_iou})
            seconds["dense"] += time.monotonic() - t0
            line += f" dense {dense.miou:.3f}"
        log.info(line)
    if HEAD in train.pooled:
        knn, lin = _global_probes(train.pooled[HEAD], train.labels, test.pooled[HEAD], test.labels, n_cls, device,
                                  cfg)
        result["head"] = {"knn": knn, "linear": lin["score"], "linear_weight_decay": lin["weight_decay"]}
        log.info("probe head: knn %.3f linear %.3f", knn, lin["score"])

    seconds["total"] = time.monotonic() - t_start
    result.update({
        "label": label or str(out_dir),
        "source": source,
        "model": getattr(visual, "preset_name", "custom"),
        "depth": visual.layers,
        "layers": layers,
        "has_head": has_pooling_head(visual),
        "feature": "layer k: mean of the patch tokens of the raw residual stream after k blocks (no ln_post); "
                   "head: forward_head of the final tokens",
        "data": {"set": str(set_dir), "train": len(train), "test": len(test), "classes": n_cls,
                 "image_size": image_size, "dense_classes": names if with_masks else None,
                 "dense_skipped": None if with_masks else "the set has no .mask.png masks",
                 "dense_set": str(dense_dir), "dense_train": len(dense_train), "dense_test": len(dense_test)},
        "protocol": {"knn": {"k": cfg["k"], "temperature": cfg["temperature"], "vote": "weighted exp(sim/T)"},
                     "linear": {"solver": "L-BFGS, standardised features", "max_iter": cfg["lbfgs_iter"],
                                "val_fraction": cfg["val_fraction"], "weight_decays": list(WEIGHT_DECAYS)},
                     "dense": {"head": "1x1 conv on standardised tokens, trained on soft token targets "
                                       "(class fractions per token), scored with logits upsampled bilinearly "
                                       "to the full mask", "solver": "L-BFGS, wd 0", "max_iter": cfg["dense_iter"],
                               "miou": "mmseg: mean over classes with a non-empty union"},
                     "seed": cfg["seed"]},
        "device": str(device),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    })
    write_probe_outputs(result, Path(out_dir), tb_dir)
    log.info("probe: wrote %s/probe.json and probe.png in %.1fs", out_dir, seconds["total"])
    return result


def write_probe_outputs(result: dict, out_dir: Path, tb_dir: Optional[Union[str, os.PathLike]] = None) -> None:
    """probe.json and probe.png (atomic), and the scalars + figure to TensorBoard when tb_dir is given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "probe.json", json.dumps(result, indent=1))
    fig = plots.layer_curves_figure(result)
    plots.save_png(fig, out_dir / "probe.png")
    if tb_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tb_dir))
        try:
            for task in plots.TASKS:
                for entry in result.get(task) or []:
                    writer.add_scalar(f"probe/{task}", entry["score"], global_step=entry["layer"])
                if (result.get("head") or {}).get(task) is not None:
                    writer.add_scalar(f"probe/{task}_head", result["head"][task], global_step=result["depth"])
            writer.add_image("probe/layers", plots.figure_rgb(fig), global_step=0, dataformats="HWC")
        finally:
            writer.close()


# ----------------------------------------------------------------------------------------------------------
# loading what to probe

def load_stage_export(export_dir: Path) -> Any:
    """The vision tower of a stage export (model.pt in Meta's layout): its structure from model.json where the
    export has one, else from config.yaml's model.preset / model.vision."""
    from pe_lightning.models import build_model, load_checkpoint
    from pe_lightning.models.clip import PECLIP
    from pe_lightning.models.presets import CLIPConfig

    weights = export_dir / "model.pt"
    if not weights.is_file():
        raise ProbeError(f"{export_dir}: no model.pt (the stage has not finished); run the stage first "
                         f"(make stage=NAME) or give weights=PATH model=PRESET")
    if (export_dir / "model.json").is_file():
        cfg = CLIPConfig.from_dict(json.loads((export_dir / "model.json").read_text()))
        cfg.vision.use_mask_token, cfg.vision.grad_checkpointing, cfg.text = False, False, None
        model = PECLIP(cfg)
    elif (export_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        recipe = OmegaConf.to_container(OmegaConf.load(export_dir / "config.yaml"), resolve=False)
        spec = recipe.get("model") or {}
        if "preset" not in spec:
            raise ProbeError(f"{export_dir}/config.yaml has no model.preset; give weights=PATH model=PRESET")
        vision = dict(spec.get("vision") or {})
        vision.update(use_mask_token=False, grad_checkpointing=False)  # training-time only, never exported
        model = build_model(spec["preset"], vision=vision, text=None)  # the probes need the vision tower only
    else:
        raise ProbeError(f"{export_dir}: neither model.json nor config.yaml beside model.pt; give "
                         f"weights={weights} model=PRESET")
    load_checkpoint(model, weights)
    return model


def load_weights(path: Path, preset: Optional[str]) -> Any:
    """The vision tower of a bare weights file (a released Meta PE-*.pt, or any supported format) as `preset`
    (default: the file stem, when it is a preset name)."""
    from pe_lightning.models import build_model, list_presets, load_checkpoint

    if not path.is_file():
        raise ProbeError(f"weights={path}: no such file; give the path of a .pt file (a stage's export/model.pt "
                         "or a released Meta PE-*.pt)")
    preset = preset or (path.stem if path.stem in list_presets() else None)
    if preset is None:
        raise ProbeError(f"weights={path}: name the model it was trained as: model=PRESET (one of "
                         f"{', '.join(list_presets())})")
    if preset not in list_presets():
        raise ProbeError(f"model={preset}: unknown preset; valid presets: {', '.join(list_presets())}")
    model = build_model(preset, text=None)
    load_checkpoint(model, path)
    return model


def _default_stage(run_dir: Path) -> str:
    done = sorted(p.parent.parent.name for p in run_dir.glob("*/export/model.pt"))
    if len(done) == 1:
        return done[0]
    if not done:
        raise ProbeError(f"{run_dir}: no finished stage export (*/export/model.pt); train one first "
                         f"(make stage=pretrain) or give weights=PATH model=PRESET")
    raise ProbeError(f"{run_dir} has several exports {done}: pick one with stage=NAME")


# ----------------------------------------------------------------------------------------------------------
# command line

_KEYS = ("run", "stage", "weights", "model", "layers", "runs_dir", "data_root", "dense_set", "image_size",
         "batch_size", "device", "tb")


def _parse(args: Sequence[str], keys: Sequence[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key not in keys:
            raise ProbeError(f"probe: unexpected argument {arg!r}; valid keys: {', '.join(k + '=' for k in keys)}")
        out[key] = value
    return out


def _int(opts: dict, key: str) -> Optional[int]:
    if key not in opts:
        return None
    try:
        return int(opts[key])
    except ValueError:
        raise ProbeError(f"{key}={opts[key]!r}: expected an integer") from None


def _bool(opts: dict, key: str, default: bool) -> bool:
    value = opts.get(key)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ProbeError(f"{key}={value!r}: expected true or false")


def parse_layers(text: Optional[str]) -> Optional[list[int]]:
    """'1,2,4' -> [1, 2, 4]; also 'all' or '' -> None (every layer) and ranges '1-4'."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    layers = []
    try:
        for part in text.replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            layers += list(range(int(lo), int(hi) + 1)) if dash else [int(part)]
    except ValueError:
        raise ProbeError(f"layers={text!r}: expected comma-separated layer numbers such as 1,2,4 or 1-4") from None
    return layers


def run_probe(args: Sequence[str]) -> dict:
    opts = _parse(args, _KEYS)
    if "stage" in opts and "weights" in opts:
        raise ProbeError("probe: give stage=NAME (a stage export of the run) or weights=PATH, not both")
    if "model" in opts and "weights" not in opts:
        raise ProbeError("probe: model=PRESET names the preset of weights=PATH; a stage export knows its own")
    run = opts.get("run", "default")
    run_dir = Path(opts.get("runs_dir", "runs")) / run
    if "weights" in opts:
        weights = Path(opts["weights"]).expanduser()
        model = load_weights(weights, opts.get("model"))
        out_dir, label, source = run_dir / f"probe-{weights.stem}", f"{run}/{weights.stem}", str(weights)
    else:
        stage = opts.get("stage") or _default_stage(run_dir)
        export = run_dir / stage / "export"
        if not export.is_dir():
            raise ProbeError(f"{export}: no such export; run the stage first (make stage={stage} run={run}) "
                             f"or give weights=PATH model=PRESET")
        model = load_stage_export(export)
        out_dir, label, source = run_dir / stage / "probe", f"{run}/{stage}", str(export / "model.pt")
    tb_dir = out_dir / "tb" if _bool(opts, "tb", True) else None
    return probe_export(model, opts.get("data_root", "data/shapes"), out_dir, layers=parse_layers(opts.get("layers")),
                        image_size=_int(opts, "image_size"), tb_dir=tb_dir, batch_size=_int(opts, "batch_size") or 128,
                        device=opts.get("device"), label=label, source=source, dense_set=opts.get("dense_set"))


def load_result(path: Union[str, os.PathLike]) -> dict:
    """A probe.json, given as the file, its folder, or the folder holding probe/probe.json."""
    p = Path(path).expanduser()
    for candidate in (p, p / "probe.json", p / "probe" / "probe.json"):
        if candidate.is_file():
            try:
                result = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ProbeError(f"{candidate}: not a probe.json ({e}); rerun the probe to rewrite it") from None
            result.setdefault("label", str(p))
            return result
    raise ProbeError(f"{path}: no probe.json there (looked for {p}, {p}/probe.json, {p}/probe/probe.json); "
                     "run `pe-lightning probe` on that export first")


def run_compare(args: Sequence[str]) -> Path:
    flags = [a for a in args if a.startswith("normalise=") or a.startswith("normalize=")]
    paths = [a for a in args if a not in flags]
    if len(paths) < 2 or not paths[0].lower().endswith(".png"):
        raise ProbeError("usage: pe-lightning probe compare OUT.png DIR_OR_JSON [DIR_OR_JSON ...] [normalise=true]")
    normalise = _bool({"normalise": flags[-1].partition("=")[2]} if flags else {}, "normalise", False)
    results = [load_result(p) for p in paths[1:]]
    out = plots.save_png(plots.compare_figure(results, normalise=normalise), paths[0])
    log.info("probe compare: wrote %s (%d exports)", out, len(results))
    return out


def main(argv: list[str]) -> int:
    """`pe-lightning probe ...` (argv: the words after `probe`). User errors raise ProbeError / DataError /
    CheckpointError (one-line messages the command line prints); returns 0. No arguments: the run `default`."""
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "compare":
        run_compare(argv[1:])
    else:
        run_probe(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
