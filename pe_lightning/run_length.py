"""A shorter (or longer) run from `train.total_samples` alone: the error names the keys that must follow it.

A recipe's phases end at its own total and its warmup fits inside it, so `train.total_samples=8000` by itself
breaks both. Scaling them silently would hide a different recipe (where the resolution changes, how long the
warmup is); the error instead gives the overrides that scale them with the new total, to paste as they are.
"""

from __future__ import annotations

from omegaconf import DictConfig

from pe_lightning.config import RecipeError

WARMUP_FRACTION = 0.05  # the warmup suggested when there are no phases to scale by (tiny recipe: 4000 / 72000)


def check_run_length(cfg: DictConfig) -> None:
    """Raise RecipeError with the scaled overrides when train.phases or optim.warmup_samples do not fit
    train.total_samples; nothing otherwise (other schedule errors are the stage's to report)."""
    total = int(cfg.train.total_samples)
    phases = list(cfg.train.phases)
    last = phases[-1].until_samples if phases else None
    warmup = int(cfg.optim.warmup_samples)
    phases_off = last is not None and int(last) != total and total > 0
    if not phases_off and warmup <= total:
        return
    factor = total / int(last) if phases_off else None
    new_warmup = round(warmup * factor) if factor and warmup * factor <= total else max(0, int(total * WARMUP_FRACTION))
    fixes = [f"'train.phases={scaled_phases(phases, factor, total)}'"] if phases_off else []
    if warmup > total or phases_off:
        fixes.append(f"optim.warmup_samples={new_warmup}")
    what = [f"train.phases end at {int(last)}"] if phases_off else []
    what += [f"optim.warmup_samples={warmup}"]
    raise RecipeError(f"train.total_samples={total} does not fit the recipe's schedule ({'; '.join(what)}). "
                      f"To train {total} samples, scale them with it: {' '.join(fixes)}")


def scaled_phases(phases: list, factor: float, total: int) -> str:
    """The phases with every end scaled by `factor` (rounded to whole batches), the last one open (null)."""
    out, prev = [], 0
    for i, p in enumerate(phases):
        until = "null"
        if i < len(phases) - 1:
            batch = int(p.batch_size)
            end = max(batch, round(int(p.until_samples) * factor / batch) * batch)
            if end <= prev or end >= total:  # too short to keep this phase apart: it merges into the next
                continue
            until, prev = str(end), end
        out.append(f"{{until_samples: {until}, resolution: {p.resolution}, batch_size: {p.batch_size}}}")
    return "[" + ", ".join(out) + "]"
