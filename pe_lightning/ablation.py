"""`make ablation` (`pe-lightning ablation`): the PE paper's robust-recipe ladder (Table 1, PE_REFERENCE.md s.6)
run on our data, every rung at the same training FLOPs.

The ladder file (recipes/ablation.yaml) lists the recipe's changes in the paper's order, each with the overrides
that undo it (its vanilla-CLIP value). Rung k is the shipped pretrain recipe with changes k+1..n undone, so rung
0 is vanilla CLIP, rung n is exactly `make stage=pretrain`, and each rung adds one change to the rung before.
Undo-overrides are applied last change first, so an earlier change's undo wins where two touch one key (the
final high-resolution phase is undone to a progressive schedule, progressive resolution to one fixed phase).

Equal FLOPs: every rung trains for the FLOPs the budget rung (vanilla) spends on its `train.total_samples`,
counted by the project's FLOP counter (`perf.tower_training_flops`, plus the mask-regularization copies). A rung
whose samples are cheaper (low-resolution phases) sees more of them, as in the paper; its phase boundaries
scale with its sample count.

Each (rung, seed) is a run `<run>-<k>-<rung>-s<seed>` in runs_dir, run by the stage manager: a finished rung is
skipped, an interrupted one resumes. At the end `<runs_dir>/<run>/ablation.md` and `ablation.png` hold the
table: zero-shot top-1, held-out pairs, each style shift and their mean ("robustness"), retrieval, samples,
FLOPs and wall time; with several seeds, mean +- standard deviation.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from pe_lightning.config import RECIPES_DIR, RecipeError, split_words
from pe_lightning.io import write_text_atomic

log = logging.getLogger("pe_lightning")

# The figures of the table: (metrics.json key, column title). Robustness is the mean of the style shifts.
SHIFTS = (("zeroshot_texture_top1", "texture"), ("zeroshot_outline_top1", "outline"),
          ("zeroshot_noise_top1", "noise"))
FIGURES = (("zeroshot_top1", "zero-shot"), ("zeroshot_heldout_top1", "held-out"), *SHIFTS,
           ("robustness", "robustness"), ("retrieval_i2t_r1", "i2t R@1"), ("retrieval_t2i_r1", "t2i R@1"))


@dataclass(frozen=True)
class Change:
    name: str
    undo: tuple[str, ...]  # overrides that give this change's vanilla-CLIP value


@dataclass(frozen=True)
class Ladder:
    changes: tuple[Change, ...]
    seeds: tuple[int, ...]  # every rung
    repeat_seeds: tuple[int, ...]  # the end points (vanilla, the full recipe) again
    path: Path
    lr_scales: tuple[float, ...] = (1.0,)  # the sweep: every rung's own lr times each of these

    @property
    def rung_names(self) -> list[str]:
        return ["vanilla"] + [change.name for change in self.changes]

    def undo_overrides(self, rung: int) -> list[str]:
        """Rung k: changes k+1..n undone, the last change first (so an earlier change's undo wins)."""
        return [word for change in reversed(self.changes[rung:]) for word in change.undo]

    def seeds_of(self, rung: int) -> tuple[int, ...]:
        end_point = rung in (0, len(self.changes))
        return tuple(dict.fromkeys(self.seeds + (self.repeat_seeds if end_point else ())))


def read_ladder(path: Path = RECIPES_DIR / "ablation.yaml") -> Ladder:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"ladder file {path} not found (the shipped one is {RECIPES_DIR / 'ablation.yaml'})")
    spec = OmegaConf.load(path)
    unknown = sorted(set(spec.keys()) - {"changes", "seeds", "repeat_seeds"})
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {unknown}; keys: changes, seeds, repeat_seeds")
    changes = []
    for entry in spec.changes:
        if "name" not in entry or "undo" not in entry:
            raise RecipeError(f"{path}: every change needs a name and its undo overrides, got {dict(entry)}")
        changes.append(Change(_slug(str(entry.name)), tuple(str(w) for w in entry.undo)))
    return Ladder(tuple(changes), tuple(int(s) for s in spec.get("seeds", [0])),
                  tuple(int(s) for s in spec.get("repeat_seeds", [])), path)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Planned:
    """One training run of the ladder: a rung, a seed, an lr scale and its FLOP-matched recipe."""
    rung: int
    seed: int
    lr_scale: float
    cfg: DictConfig


def run_name(run: str, rung: int, name: str, seed: int, lr_scale: float) -> str:
    return f"{run}-{rung}-{name}-s{seed}" + ("" if lr_scale == 1.0 else f"-lr{lr_scale:g}")


def rung_recipe(ladder: Ladder, rung: int, seed: int, run: str, extra: Sequence[str] = (),
                lr_scale: float = 1.0) -> DictConfig:
    """The pretrain recipe of one rung and seed, before the FLOP matching (`extra` applies to every rung)."""
    from pe_lightning.stages import load_stage_recipe

    name = ladder.rung_names[rung]
    # `extra` edits the PE recipe (data, model size, a knob); the undos then turn changes off on top of it
    words = [*extra, *ladder.undo_overrides(rung), f"seed={seed}", f"run={run_name(run, rung, name, seed, lr_scale)}"]
    try:
        cfg = load_stage_recipe("pretrain", words)
    except RecipeError as err:
        raise RecipeError(f"{ladder.path}, rung {rung} ({name}): {err}") from None
    cfg.optim.lr = float(cfg.optim.lr) * lr_scale
    return cfg


def flops_per_sample(cfg: DictConfig, resolution: int) -> float:
    """Training FLOPs of one pretrain sample at `resolution` (`PretrainStage.flops_per_sample`), counted once
    per model and resolution (a count builds the model on the meta device: ~1 s)."""
    m, mask = cfg.model, cfg.pretrain.mask_reg
    key = json.dumps([OmegaConf.to_container(m, resolve=True), resolution, bool(mask.enabled),
                      float(mask.batch_fraction)], sort_keys=True)
    if key not in _FLOPS:
        from pe_lightning.stages.pretrain import pretrain_flops_per_sample

        _FLOPS[key] = pretrain_flops_per_sample(cfg, resolution)
    return _FLOPS[key]


_FLOPS: dict[str, float] = {}


def phases_of(cfg: DictConfig) -> list[tuple[int, int]]:
    """(samples in the phase, resolution) per phase of a recipe, as the stage builds its schedule."""
    train = cfg.train
    if not train.phases:
        return [(int(train.total_samples), int(cfg.data.image_size))]
    out, start = [], 0
    for phase in train.phases:
        end = int(train.total_samples if phase.until_samples is None else phase.until_samples)
        out.append((end - start, int(phase.resolution)))
        start = end
    return out


def training_flops(cfg: DictConfig) -> float:
    return sum(samples * flops_per_sample(cfg, res) for samples, res in phases_of(cfg))


def match_flops(cfg: DictConfig, budget: float) -> DictConfig:
    """The recipe with total_samples (and its phase boundaries, in proportion) scaled to spend `budget` FLOPs,
    rounded to whole batches of the largest batch it trains with."""
    scale = budget / training_flops(cfg)
    train = cfg.train
    unit = max(int(p.batch_size) for p in train.phases) if train.phases else int(train.batch_size)
    total = max(unit, int(round(train.total_samples * scale / unit)) * unit)
    out = cfg.copy()
    out.train.total_samples = total
    for phase in out.train.phases:
        if phase.until_samples is not None:
            phase.until_samples = max(unit, int(round(phase.until_samples * scale / unit)) * unit)
    return out


def plan(ladder: Ladder, run: str, extra: Sequence[str] = (), rungs: Optional[Sequence[int]] = None
         ) -> list[Planned]:
    """Every run of the ladder, FLOP-matched: the budget is what rung 0's recipe spends."""
    budget = training_flops(rung_recipe(ladder, 0, ladder.seeds_of(0)[0], run, extra))
    chosen = range(len(ladder.rung_names)) if rungs is None else rungs
    bad = [k for k in chosen if not 0 <= k < len(ladder.rung_names)]
    if bad:
        raise RecipeError(f"rungs={bad}: the ladder has rungs 0..{len(ladder.rung_names) - 1}")
    return [Planned(k, seed, scale, match_flops(rung_recipe(ladder, k, seed, run, extra, scale), budget))
            for k in chosen for scale in ladder.lr_scales for seed in ladder.seeds_of(k)]


def run_ladder(ladder: Ladder, run: str = "ablation", extra: Sequence[str] = (),
               rungs: Optional[Sequence[int]] = None) -> Path:
    """Train every (rung, seed) not DONE, then write the table; returns ablation.md."""
    from pe_lightning.pipeline import run_stage

    runs = plan(ladder, run, extra, rungs)
    for p in runs:
        log.info("ablation rung %d (%s), seed %d, lr %.3g: %s samples, %.3g FLOPs", p.rung,
                 ladder.rung_names[p.rung], p.seed, p.cfg.optim.lr, p.cfg.train.total_samples,
                 training_flops(p.cfg))
        run_stage(p.cfg)
    return write_table(ladder, runs, Path(runs[0].cfg.runs_dir) / run)


def rung_metrics(cfg: DictConfig) -> dict:
    from pe_lightning.pipeline import stage_dir

    metrics = json.loads((stage_dir(cfg).export / "metrics.json").read_text())
    shifts = [metrics[key] for key, _ in SHIFTS if key in metrics]
    if len(shifts) == len(SHIFTS):
        metrics["robustness"] = sum(shifts) / len(shifts)
    metrics["train_flops"] = training_flops(cfg)
    return metrics


def _percent_mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    text = f"{100 * statistics.fmean(values):.1f}"
    return text + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


def table_rows(ladder: Ladder, runs: list[Planned]) -> list[dict]:
    """One row per rung (and lr scale): its figures over its seeds."""
    rows = []
    for rung, scale in sorted({(p.rung, p.lr_scale) for p in runs}):
        mine = [p for p in runs if (p.rung, p.lr_scale) == (rung, scale)]
        metrics = [rung_metrics(p.cfg) for p in mine]
        name = ladder.rung_names[rung] + ("" if len(ladder.lr_scales) == 1 else f" (lr {mine[0].cfg.optim.lr:.3g})")
        row = {"rung": rung, "name": name, "lr": float(mine[0].cfg.optim.lr), "seeds": len(metrics)}
        for key in (*(key for key, _ in FIGURES), "samples_seen", "train_flops", "train_seconds"):
            row[key] = [m[key] for m in metrics if key in m]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["rung", "adds", "seeds", *(title for _, title in FIGURES), "samples", "GFLOPs", "wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["rung"]), row["name"], str(row["seeds"])]
        cells += [_percent_mean_sd(row[key]) for key, _ in FIGURES]
        cells += [f"{statistics.fmean(row['samples_seen']):,.0f}" if row["samples_seen"] else "-",
                  f"{statistics.fmean(row['train_flops']) / 1e9:,.0f}",
                  f"{statistics.fmean(row['train_seconds']):.0f}" if row["train_seconds"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: list[dict]):
    from pe_lightning.eval.plots import new_figure

    fig = new_figure(8.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(rows)))
    titles = dict(FIGURES)
    for key in ("zeroshot_top1", "zeroshot_heldout_top1", "robustness", "retrieval_i2t_r1"):
        means = [100 * statistics.fmean(r[key]) if r[key] else math.nan for r in rows]
        spread = [100 * statistics.stdev(r[key]) if len(r[key]) > 1 else 0.0 for r in rows]
        ax.errorbar(x, means, yerr=spread, marker="o", capsize=3, label=titles[key])
    ax.set_xticks(x, [r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title("PE recipe ladder at equal training FLOPs (each rung adds one change)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: no point hidden
    fig.tight_layout()
    return fig


def write_table(ladder: Ladder, runs: list[Planned], out_dir: Path) -> Path:
    from pe_lightning.eval.plots import save_png

    rows = table_rows(ladder, runs)
    text = (f"# The PE recipe ladder at equal training FLOPs\n\nLadder: `{ladder.path}`. Rung 0 is vanilla CLIP; "
            "each rung adds the named change to the one before; the last is `make stage=pretrain`. "
            "Robustness = mean of the style shifts. With several seeds: mean ± standard deviation.\n\n"
            + markdown(rows) + "\n\n![ladder](ablation.png)\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_png(figure(rows), out_dir / "ablation.png")
    write_text_atomic(out_dir / "ablation.json", json.dumps(rows, indent=2))
    return write_text_atomic(out_dir / "ablation.md", text)


def main(args: list[str]) -> Path:
    """pe-lightning ablation [ladder=FILE] [run=NAME] [rungs=0,7] [seeds=0,1] [repeat_seeds=] [lr_scales=0.5,1,2]
    [key=value ...]: `key=value` words edit the PE recipe of every rung (before its undos)."""
    picked, extra = split_words(args, "ladder", "run", "rungs", "seeds", "repeat_seeds", "lr_scales")
    ladder = read_ladder(Path(picked.get("ladder", RECIPES_DIR / "ablation.yaml")))
    for key in ("seeds", "repeat_seeds"):
        if key in picked:
            ladder = _replace_seeds(ladder, key, picked[key])
    if picked.get("lr_scales"):
        ladder = replace(ladder, lr_scales=tuple(float(s) for s in picked["lr_scales"].split(",")))
    rungs = [int(k) for k in picked["rungs"].split(",")] if picked.get("rungs") else None
    out = run_ladder(ladder, picked.get("run", "ablation"), extra, rungs)
    print(out.read_text())
    return out


def _replace_seeds(ladder: Ladder, key: str, value: str) -> Ladder:
    seeds = tuple(int(s) for s in value.split(",") if s.strip())
    if key == "seeds" and not seeds:
        raise RecipeError("seeds= needs at least one seed")
    return replace(ladder, **{key: seeds})
