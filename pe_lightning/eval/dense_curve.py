"""The per-layer dense-probe curve of a vision tower on a labelled mask set: the dense_eval callback's measure,
shared with the spatial stage's `teacher_layer: auto` (the library never imports callbacks/)."""

from __future__ import annotations

from pathlib import Path

import torch

from pe_lightning.eval.probe_run import IGNORE, dense_classes, split_features
from pe_lightning.eval.probes import dense_probe_fit

__all__ = ["dense_targets", "dense_curve"]


def dense_targets(masks: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Semantic ids (1 + label, 0 = background) -> dense classes through `lut`; ids past it are ignored."""
    masks = masks.long()
    out = lut[masks.clamp(0, len(lut) - 1)]
    out[masks >= len(lut)] = IGNORE
    return out


def dense_curve(visual, set_dir: Path, layers: list[int], image_size: int, batch_size: int,
                device: torch.device, max_iter: int) -> dict[int, dict]:
    """layer -> {"miou", "class_iou"} of the dense probe on `layers` of `visual`, features in one pass."""
    train, classnames = split_features(visual, set_dir, "train", layers, image_size, batch_size, device, True)
    test, _ = split_features(visual, set_dir, "test", layers, image_size, batch_size, device, True)
    if train.masks is None or test.masks is None:
        raise FileNotFoundError(f"dense curve: {set_dir} has no .mask.png masks to probe")
    names, lut = dense_classes(classnames)
    train_y, test_y = dense_targets(train.masks, lut), dense_targets(test.masks, lut)
    out = {}
    for k in layers:
        fit = dense_probe_fit(train.maps[k].to(device), train_y.to(device), test.maps[k].to(device),
                              test_y.to(device), len(names), max_iter=max_iter, ignore_index=IGNORE)
        out[k] = {"miou": fit.miou, "class_iou": fit.class_iou}
    return out
