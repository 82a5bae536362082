"""Dense-probe mIoU of a stage's patch tokens at the end of training, beside its parent's per-layer curve.

Recipe: `callbacks: [{name: dense_eval, args: {parent: true, batch_size: 128, max_iter: 50, dense_set: null}}]`.
The probe is pe_lightning/eval/probes.py's dense probe (a 1x1-conv on standardised frozen patch tokens, fit on
the `train` split of the labelled mask set, mIoU on its `test` split; on the shapes world `<data.root>/
zeroshot/test`: background + the 6 shapes), at the stage's training resolution. `dense_set` picks the set
(single | multi | a folder, eval/probe_run.dense_set_dir); None = the stage's own `dense_set` key
(spatial.dense_set) where it has one, else single. A parent curve the stage already measured on the same set,
resolution and probe (spatial.teacher_layer=auto) is reused. Keys of export/metrics.json:
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

from pe_lightning.eval.dense_curve import dense_curve, dense_targets  # noqa: F401  (dense_targets: re-exported)
from pe_lightning.eval.probe_run import dense_set_dir

log = logging.getLogger("pe_lightning")


class DenseEval(L.Callback):
    def __init__(self, cfg, parent: bool = True, batch_size: int = 128, max_iter: int = 50, dense_set=None):
        self.cfg = cfg
        self.dense_set = dense_set
        self.parent = parent  # also the parent's per-layer curve, under `parent_` keys
        self.batch_size = batch_size
        self.max_iter = max_iter  # L-BFGS iterations of the probe (probe_run's default: 50)

    @property
    def set_dir(self) -> Path:
        chosen = self.dense_set
        if chosen is None:
            section = self.cfg.get(self.cfg.get("stage", ""), None) if hasattr(self.cfg, "get") else None
            chosen = section.get("dense_set", None) if section is not None and hasattr(section, "get") else None
        return dense_set_dir(self.cfg.data.root, chosen)

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
            memo = getattr(pl_module, "parent_curve_memo", None) or {}
            init = getattr(pl_module, "parents", {}).get("init")
            want = (str(self.set_dir), res, self.max_iter, str(init.weights) if init is not None else None)
            if memo.get("key") == want and sorted(memo["curve"]) == list(range(1, pv.layers + 1)):
                curve = memo["curve"]  # measured at the start on the same parent, set, resolution and probe
            else:
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
