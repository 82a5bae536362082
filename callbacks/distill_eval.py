"""The distill stage's evaluation: the distilled student, its teacher and the scratch baseline, side by side.

Recipe: `callbacks: [{name: distill_eval, args: {every_n_steps: 0, limit: null, parent: true}}]` (in place of
clip_eval, whose figures it computes: it is ClipEval with two more models). At the end of the stage:
  <key>          the distilled student (eval_model()), every figure of clip_eval (zeroshot_top1, ...)
  teacher_<key>  the teacher (the stage's parent_model()), evaluated at the teacher's own resolution
                 (the stage's `teacher_phase()`); the same figures also under parent_<key>, the contract's name
  scratch_<key>  the stage's scratch_model(): the same student preset trained with the plain CLIP loss on the
                 same batches from the same initial weights (absent without distill.scratch_baseline)
  distill_gain_zeroshot_top1 = zeroshot_top1 - scratch_zeroshot_top1
  teacher_gap_zeroshot_top1  = teacher_zeroshot_top1 - zeroshot_top1
and logs the table of the three models' headline figures. Works with any stage that has `parent_model()`
(and optionally `scratch_model()`, `teacher_phase()`); it imports no stage file.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager

import lightning as L

from pe_lightning.callback_loader import resolve_class

log = logging.getLogger("pe_lightning")

ClipEval = resolve_class("clip_eval")
is_clip_model = inspect.getmodule(ClipEval).is_clip_model  # the same test of "can be scored as CLIP"
_TABLE_KEYS = ("zeroshot_top1", "zeroshot_heldout_top1", "zeroshot_top5", "retrieval_i2t_r1", "retrieval_t2i_r1")


@contextmanager
def _evaluated_at(pl_module: L.LightningModule, phase):
    """ClipEval preprocesses at `pl_module.current_phase.resolution`: swap in another phase meanwhile."""
    saved = pl_module.current_phase
    pl_module.current_phase = phase
    try:
        yield
    finally:
        pl_module.current_phase = saved


class DistillEval(ClipEval):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.finished:
            return
        pl_module.metrics.update(self.evaluate(trainer, pl_module))
        if trainer.is_global_zero:
            rows = {"distilled student": pl_module.metrics}
            teacher = pl_module.parent_model() if self.parent else None
            if teacher is not None and is_clip_model(teacher):
                phase = pl_module.teacher_phase() if hasattr(pl_module, "teacher_phase") else pl_module.current_phase
                with _evaluated_at(pl_module, phase):
                    figures = self._evaluate_model(teacher, pl_module)
                for prefix in ("teacher_", "parent_"):
                    pl_module.metrics.update({prefix + k: v for k, v in figures.items()})
                rows["teacher"] = figures
            scratch = pl_module.scratch_model() if hasattr(pl_module, "scratch_model") else None
            if scratch is not None:
                figures = self._evaluate_model(scratch, pl_module)
                pl_module.metrics.update({"scratch_" + k: v for k, v in figures.items()})
                rows["scratch student (plain CLIP)"] = figures
            self._add_gaps(pl_module.metrics)
            log.info("%s", self.table(rows, pl_module.samples_seen))
        trainer.strategy.barrier()

    @staticmethod
    def _add_gaps(metrics: dict) -> None:
        key = "zeroshot_top1"
        if key in metrics and "scratch_" + key in metrics:
            metrics["distill_gain_" + key] = metrics[key] - metrics["scratch_" + key]
        if key in metrics and "teacher_" + key in metrics:
            metrics["teacher_gap_" + key] = metrics["teacher_" + key] - metrics[key]

    @staticmethod
    def table(rows: dict[str, dict], samples: int) -> str:
        """The side-by-side table (fractions, 1.0 = all correct), one row per model."""
        keys = [k for k in _TABLE_KEYS if any(k in r for r in rows.values())]
        width = max(len(name) for name in rows)
        lines = [f"distill at {samples} samples (each student saw these samples):",
                 "  " + " " * width + "".join(f"  {k:>21}" for k in keys)]
        for name, figures in rows.items():
            cells = "".join(f"  {figures[k]:>21.3f}" if k in figures else f"  {'-':>21}" for k in keys)
            lines.append(f"  {name:<{width}}{cells}")
        return "\n".join(lines)
