"""Dense-probe mIoU of a stage's patch tokens at the end of training, beside its parent's per-layer curve.

Recipe: `callbacks: [{name: dense_eval, args: {parent: true, batch_size: 128, max_iter: 50}}]`.
The probe is pe_lightning/eval/probes.py's dense probe (a 1x1-conv on standardised frozen patch tokens, fit on
the `train` split of the labelled mask set, mIoU on its `test` split; on the shapes world `<data.root>/
zeroshot/test`: background + the 6 shapes), at the stage's training resolution. Keys of export/metrics.json:
  dense_miou                  the trained model's last layer (its output tokens)
  dense_class_iou             its per-class IoU (None where a class is absent from target and prediction)
  parent_dense_miou           the parent's last layer (with `parent`)
  parent_dense_miou_best, parent_dense_best_layer   the parent's best layer (1-based) and its mIoU
  parent_dense_curve          [{"layer": k, "score": mIoU}, ...] for every layer of the parent
  dense_miou_gain             dense_miou - parent_dense_miou
"Layer k" is the raw residual stream after k blocks (no ln_post), as the probes define it. Runs on global
rank 0 on the un-wrapped models; the other ranks wait at a barrier.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from pe_lightning.eval.probe_run import IGNORE, dense_classes, probe_set_dir, split_features
from pe_lightning.eval.probes import dense_probe_fit

log = logging.getLogger("pe_lightning")


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
        raise FileNotFoundError(f"dense_eval: {set_dir} has no .mask.png masks to probe")
    names, lut = dense_classes(classnames)
    train_y, test_y = dense_targets(train.masks, lut), dense_targets(test.masks, lut)
    out = {}
    for k in layers:
        fit = dense_probe_fit(train.maps[k].to(device), train_y.to(device), test.maps[k].to(device),
                              test_y.to(device), len(names), max_iter=max_iter, ignore_index=IGNORE)
        out[k] = {"miou": fit.miou, "class_iou": fit.class_iou}
    return out


class DenseEval(L.Callback):
    def __init__(self, cfg, parent: bool = True, batch_size: int = 128, max_iter: int = 50):
        self.cfg = cfg
        self.parent = parent  # also the parent's per-layer curve, under `parent_` keys
        self.batch_size = batch_size
        self.max_iter = max_iter  # L-BFGS iterations of the probe (probe_run's default: 50)

    @property
    def set_dir(self) -> Path:
        return probe_set_dir(self.cfg.data.root)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for split in ("train", "test"):
            if not (self.set_dir / split).is_dir():
                raise FileNotFoundError(f"dense_eval: no labelled mask set at {self.set_dir}/{split} (the shapes "
                                        "world's zeroshot/test, under data.root); point data.root at it or drop "
                                        "the dense_eval callback")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.finished:
            return
        if trainer.is_global_zero:
            pl_module.metrics.update(self.evaluate(pl_module))
        trainer.strategy.barrier()

    def evaluate(self, pl_module: L.LightningModule) -> dict:
        t0 = time.monotonic()
        res = pl_module.current_phase.resolution
        device = pl_module.device
        visual = pl_module.eval_model().visual
        mine = dense_curve(visual, self.set_dir, [visual.layers], res, self.batch_size, device, self.max_iter)
        last = mine[visual.layers]
        metrics: dict = {"dense_miou": last["miou"], "dense_class_iou": last["class_iou"]}
        line = f"dense probe at {pl_module.samples_seen} samples: dense_miou={last['miou']:.3f}"
        parent = pl_module.parent_model() if self.parent else None
        if parent is not None:
            pv = parent.visual
            curve = dense_curve(pv, self.set_dir, list(range(1, pv.layers + 1)), res, self.batch_size, device,
                                self.max_iter)
            best = max(curve, key=lambda k: (curve[k]["miou"], -k))  # ties to the earlier layer
            metrics.update({
                "parent_dense_miou": curve[pv.layers]["miou"],
                "parent_dense_miou_best": curve[best]["miou"],
                "parent_dense_best_layer": int(best),
                "parent_dense_curve": [{"layer": k, "score": v["miou"]} for k, v in sorted(curve.items())],
                "dense_miou_gain": last["miou"] - curve[pv.layers]["miou"],
            })
            line += (f", parent last layer {curve[pv.layers]['miou']:.3f}, best layer {best} "
                     f"{curve[best]['miou']:.3f} (curve " + " ".join(f"{curve[k]['miou']:.3f}" for k in sorted(curve))
                     + ")")
        log.info("%s in %.1fs", line, time.monotonic() - t0)
        return metrics
