"""`pe-lightning report run=NAME` (`make report`): runs/<run>/report.md and its PNGs, readable on GitHub.

What it holds, for every stage of the pipeline that is DONE:
- the stage's headline (the figure it is for, and its gain over the baseline it must beat; as `status`);
- a table with one row per figure in its export/metrics.json (the first eval set's figures once, under the
  headline keys), beside the parent's value where the stage measured the parent too (`parent_<key>`) and the
  headline's own baseline (distill's scratch student, lang's blind LM), each with the change: what the stage
  cost or bought (image zero-shot after video, global features after spatial);
- `report_probes.png`: the per-layer probe curves of every probed export (`make probe`, or the pipeline's
  probes) on one plot, and the command that probes each export not probed yet;
- `report_loss.png`: the training losses (`train/*loss*`) of each stage from its TensorBoard logs.
It reads only what the stages wrote; nothing is recomputed, so it takes seconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pe_lightning.errors import UserError
from pe_lightning.eval import plots
from pe_lightning.io import write_text_atomic

# Metric names that hold a fraction in [0, 1], printed as a percentage.
_PERCENT = ("top1", "top5", "_r1", "_r5", "_r10", "miou", "exact_match", "_acc")
_LOSS_PNG, _PROBE_PNG = "report_loss.png", "report_probes.png"


class ReportError(UserError, RuntimeError):
    """The report cannot be written: no such run, or no finished stage in it."""


def _is_percent(key: str) -> bool:
    return any(key.endswith(s) or f"{s}_" in key for s in _PERCENT) and "best_layer" not in key


def _fmt(key: str, value) -> str:
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):  # per class, per layer
        return ", ".join(f"{v:.3f}" for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if _is_percent(key):
        return f"{100 * value:.1f}%"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _change(key: str, value, parent) -> str:
    if not isinstance(value, (int, float)) or not isinstance(parent, (int, float)):
        return ""
    return f"{100 * (value - parent):+.1f} pts" if _is_percent(key) else f"{value - parent:+.4g}"


def finished_stages(run_dir: Path) -> list[tuple[str, dict]]:
    """(stage, metrics) for each stage of the pipeline that is DONE, in pipeline order."""
    from pe_lightning.pipeline import StageDir, read_pipeline

    out = []
    for stage in read_pipeline():
        sdir = StageDir(run_dir / stage)
        metrics_file = sdir.export / "metrics.json"
        if sdir.done.exists() and metrics_file.exists():
            out.append((stage, json.loads(metrics_file.read_text())))
    return out


def metrics_table(stage: str, metrics: dict, first_sets: tuple[str, ...] = ()) -> list[str]:
    """Markdown rows: figure | this stage | each baseline the stage measured (its parent; the scratch student or
    the blind LM of its headline) with the change against it. Headline keys first, then the rest by name; one
    row per figure: the baselines' own keys and the first eval set's named copies (`first_sets`) are left out."""
    from pe_lightning.stages import stage_class

    baselines = [b for b in _baselines(stage_class(stage).headline) if any(b.key(k) in metrics for k in metrics)]
    shown = [k for k in metrics if not _hidden(k, metrics, baselines, first_sets)]
    first = [k for k in stage_class(stage).headline_metrics if k in shown]
    rows = ["| figure | this stage |" + "".join(f" {b.name} | change |" for b in baselines),
            "|---|---|" + "---|---|" * len(baselines)]
    for key in first + sorted(k for k in shown if k not in first):
        cells = ""
        for b in baselines:
            base = metrics.get(b.key(key))
            cells += f" {_fmt(key, base) if base is not None else ''} | {_change(key, metrics[key], base)} |"
        rows.append(f"| `{key}` | {_fmt(key, metrics[key])} |{cells}")
    return rows


@dataclass(frozen=True)
class _Baseline:
    """A model the stage measured beside itself, its figures under other keys: `parent_<key>`, or the headline's
    own form (`scratch_<key>`, `vqa_blind_<rest>` for `vqa_<rest>`)."""
    name: str
    prefix: str  # the part of a key before the insertion point
    insert: str

    def key(self, key: str) -> str:
        return self.prefix + self.insert + key[len(self.prefix):] if key.startswith(self.prefix) else ""

    def owns(self, key: str, metrics: dict) -> bool:
        """`key` is this baseline's copy of a figure the stage has (parent_blend, a knob, is not)."""
        head = self.prefix + self.insert
        return key.startswith(head) and self.prefix + key[len(head):] in metrics


def _baselines(headline) -> list[_Baseline]:
    """The parent, and the headline's own baseline where it is another: the split of its key that its
    `versus` key inserts a word into (zeroshot_top1 -> scratch_ + zeroshot_top1, vqa_ + blind_ + exact_match)."""
    out = [_Baseline("parent", "", "parent_")]
    key, versus = (headline.key, headline.versus) if headline else ("", None)
    if versus and not versus.startswith("parent_"):
        for i in range(len(key) + 1):
            if versus.startswith(key[:i]) and versus.endswith(key[i:]) and len(versus) > len(key):
                insert = versus[i: len(versus) - (len(key) - i)]
                out.append(_Baseline(headline.versus_name or insert.strip("_"), key[:i], insert))
                break
    return out


# Keys that repeat what a table row already shows: the teacher's copy of the parent figures (distill), and the
# distill gains, which are the change columns.
_REPEATS = ("teacher_", "distill_gain_", "teacher_gap_")


def _hidden(key: str, metrics: dict, baselines: list[_Baseline], first_sets: tuple[str, ...]) -> bool:
    if key.startswith(_REPEATS) or any(b.owns(key, metrics) for b in baselines + _baselines(None)):
        return True
    for kind, name in zip(("zeroshot_", "retrieval_"), first_sets):  # zeroshot_shapes_top1 = zeroshot_top1
        if name and key.startswith(f"{kind}{name}_"):
            alias = kind + key[len(kind) + len(name) + 1:]
            return metrics.get(alias) == metrics[key]
    return False


def first_eval_sets(export: Path) -> tuple[str, str]:
    """The names of the first zero-shot and retrieval sets of the export's recipe: their figures are also the
    unnamed headline keys (eval/clip_sets.py)."""
    from pe_lightning.exports import Export

    recipe = Export(export / "model.pt", export).recipe
    sets = recipe.get("eval", {}) if recipe is not None else {}
    return tuple(str(sets[kind][0].name) if sets.get(kind) else "" for kind in ("zeroshot", "retrieval"))


def loss_curves(run_dir: Path, stages: list[str]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """stage -> tag -> (steps, values) of every `train/*loss*` scalar in the stage's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for stage in stages:
        tb = run_dir / stage / "tb"
        if not tb.is_dir():
            continue
        events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        events.Reload()
        tags = [t for t in events.Tags()["scalars"] if t.startswith("train/") and "loss" in t]
        for tag in tags:
            points = sorted({e.step: e.value for e in events.Scalars(tag)}.items())  # a resume may repeat steps
            curves.setdefault(stage, {})[tag] = ([s for s, _ in points], [v for _, v in points])
    return curves


def loss_figure(curves: dict[str, dict[str, tuple[list[int], list[float]]]]):
    fig = plots.new_figure(4.0 * len(curves), 3.4)
    for i, (stage, tags) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), i + 1)
        for tag, (steps, values) in tags.items():
            ax.plot(steps, values, label=tag.removeprefix("train/"), linewidth=1)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def probe_results(run_dir: Path, stages: list[str]) -> list[dict]:
    from pe_lightning.eval.probe_run import load_result

    results = []
    for stage in stages:
        if (run_dir / stage / "probe" / "probe.json").is_file():
            result = load_result(run_dir / stage)
            result["label"] = stage
            results.append(result)
    return results


def write_report(run_dir: Path) -> Path:
    """runs/<run>/report.md (+ PNGs beside it), written atomically; returns the report's path."""
    from pe_lightning.stages import stage_class

    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder; run a stage first (make stage=pretrain run={run_dir.name})")
    stages = finished_stages(run_dir)
    if not stages:
        raise ReportError(f"{run_dir}: no stage is DONE yet; `make status run={run_dir.name}` shows where each is")
    names = [s for s, _ in stages]
    lines = [f"# Run `{run_dir.name}`", "", "| stage | headline | samples | train time |", "|---|---|---|---|"]
    for stage, metrics in stages:
        headline = stage_class(stage).headline
        lines.append(f"| {stage} | {headline.format(metrics) if headline else ''} | "
                     f"{metrics.get('samples_seen', '')} | {metrics.get('train_seconds', 0) / 60:.1f} min |")
    probes = probe_results(run_dir, names)
    lines += ["", "## Per-layer probes", ""]
    if probes:
        plots.save_png(plots.compare_figure(probes, title="per-layer probes of each export"), run_dir / _PROBE_PNG)
        lines += [f"![probe curves of every export]({_PROBE_PNG})"]
    unprobed = [s for s in names if s not in {p["label"] for p in probes}]
    if unprobed:
        lines += [("" if not probes else "\n") + "Not probed yet: " + ", ".join(
            f"`make probe run={run_dir.name} stage={s}`" for s in unprobed)
            + " (`make pipeline` probes each export after its stage), then `make report` again."]
    curves = loss_curves(run_dir, names)
    if curves:
        plots.save_png(loss_figure(curves), run_dir / _LOSS_PNG)
        lines += ["", "## Training losses", "", f"![training loss of each stage]({_LOSS_PNG})"]
    for stage, metrics in stages:
        table = metrics_table(stage, metrics, first_eval_sets(run_dir / stage / "export"))
        lines += ["", f"## {stage}", "", *table]
    return write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")  # the command prints its path


def main(args: list[str]) -> Path:
    opts = dict(a.partition("=")[::2] for a in args)
    unknown = sorted(set(opts) - {"run", "runs_dir"})
    if unknown:
        raise ReportError(f"report: unexpected argument(s) {unknown}; usage: pe-lightning report run=NAME [runs_dir=runs]")
    return write_report(Path(opts.get("runs_dir", "runs")) / opts.get("run", "default"))
