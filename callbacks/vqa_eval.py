"""Held-out visual question answering at the end of the lang stage (and every `every_n_steps`), by greedy
generation (pe_lightning/eval/vqa.py): exact match after normalisation, overall and per question type.

Recipe: `callbacks: [{name: vqa_eval, args: {every_n_steps: 0, max_questions: null, max_new_tokens: 8}}]`.
Reads instruction shards at `path` (default `<data.root>/instruct_test`, the shapes world's held-out scenes);
each question is asked on its own (single-turn prompt) at the stage's resolution. Keys in export/metrics.json:
vqa_exact_match, vqa_<type>_exact_match (colour, shape, count, size, position, yesno) and *_num_questions;
with the stage's blind baseline (lang.blind_baseline) the same under vqa_blind_*, the blind LM answering
with zeros at the image positions, as it was trained; the warm-up model's own figures (projector trained, the
full phase not begun: evaluated once at the switch, before the full phase changes anything) under
vqa_warmup_*, so the full phase's gain or loss is measured on the same questions. `examples` answers are
logged (question, gold, ours).
Runs on global rank 0; the other ranks wait at a barrier.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning as L

from pe_lightning.data.instruction import load_instruction_set
from pe_lightning.eval.vqa import vqa_eval

log = logging.getLogger("pe_lightning")


class VQAEval(L.Callback):
    def __init__(self, cfg, every_n_steps: int = 0, max_questions: Optional[int] = None, max_new_tokens: int = 8,
                 path: Optional[str] = None, batch_size: int = 64, examples: int = 6):
        self.cfg = cfg
        self.every_n_steps = every_n_steps  # 0: only at the end of the stage
        self.max_questions = max_questions  # None: every question of the split
        self.max_new_tokens = max_new_tokens  # shapes-world answers are one to four words
        self.path = Path(path) if path else Path(cfg.data.root) / "instruct_test"
        self.batch_size = batch_size  # images per generation batch (each with all its questions)
        self.examples = examples

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"VQA eval set {self.path} does not exist: generate the shapes world "
                                    "(pe-lightning data shapes --out DIR), give the callback `path: DIR` of "
                                    "held-out instruction shards, or drop vqa_eval from the recipe's callbacks")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Callbacks' batch-start hooks run before the stage's, which applies the switch: this is the warm-up model.
        if pl_module.args.projector_samples > 0 and pl_module.in_full_phase() and not pl_module.full_phase_started:
            pl_module.metrics.update(self.evaluate(trainer, pl_module, blind=False, prefix="vqa_warmup"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not pl_module.finished:
            self.evaluate(trainer, pl_module, blind=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.finished:
            return
        metrics = self.evaluate(trainer, pl_module, blind=pl_module.blind_lm is not None)
        if pl_module.args.projector_samples >= pl_module.cfg.train.total_samples:  # warm-up only: the same model
            metrics.update({k.replace("vqa_", "vqa_warmup_", 1): v for k, v in metrics.items()
                            if not k.startswith("vqa_blind_")})
        pl_module.metrics.update(metrics)

    def evaluate(self, trainer: L.Trainer, pl_module, blind: bool, prefix: str = "vqa") -> dict[str, float]:
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            metrics = self._score(pl_module, pl_module.model.lm, prefix)
            if blind:
                metrics.update(self._score(pl_module, pl_module.blind_lm, "vqa_blind", blind=True))
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            shown = {k: v for k, v in metrics.items() if k.endswith("exact_match")}
            log.info("VQA at %d samples: %s", pl_module.samples_seen,
                     ", ".join(f"{k}={v:.3f}" for k, v in sorted(shown.items())))
        trainer.strategy.barrier()
        return metrics

    def _score(self, pl_module, lm, prefix: str, blind: bool = False) -> dict[str, float]:
        loader = load_instruction_set(self.path, self.cfg.data.image_size, self.batch_size)
        seen: list[tuple[str, str, str]] = []
        a = pl_module.args
        metrics = vqa_eval(lm, pl_module.tokenizer_obj, pl_module.model.projector, pl_module.encode_for_eval, loader,
                           blind=blind, prefix=prefix, max_questions=self.max_questions,
                           max_new_tokens=self.max_new_tokens, template=a.template, system=a.system,
                           on_answer=lambda q, g, p: seen.append((q, g, p)) if len(seen) < self.examples else None)
        for q, g, p in seen:
            log.info("  %s: %s | gold %r | answer %r", prefix, q, g, p)
        return {k: float(v) for k, v in metrics.items()}
