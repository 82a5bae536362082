"""Per-layer probe curves with matplotlib's Agg canvas (no pyplot, no display, no global backend change).

`layer_curves_figure` is the paper's layer-wise figure: one curve per probe task, x = layer k (the output
after k blocks, 1-based), y = the task's score divided by its score at its best layer, so every curve peaks
at 1.0 at the layer that task likes best. The pooled-embedding score (`"head"`, where the model has one) is a
marker on the task's colour one step right of the last layer, divided by the same best-layer score (it may
exceed 1: that is alignment moving the best features to the output). Each legend entry names the best layer
and its raw score.

`compare_figure` draws several probe results (several exports: pretrain vs video vs lang vs spatial, ours vs
a released file) with one panel per task and one curve per export, raw scores by default.

Input: the dict `probe.json` holds: {"knn": [{"layer": k, "score": s}, ...], "linear": [...],
"dense": [...], "head": {"knn": s, "linear": s} or None, "label": str, ...}.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pe_lightning.io import write_bytes_atomic

__all__ = ["TASKS", "TASK_LABELS", "layer_curves_figure", "compare_figure", "new_figure", "save_png", "figure_rgb",
           "normalised_curve"]

TASKS = ("knn", "linear", "dense")
TASK_LABELS = {"knn": "kNN top-1", "linear": "linear top-1", "dense": "dense mIoU"}
_COLOURS = {"knn": "tab:blue", "linear": "tab:orange", "dense": "tab:green"}


def _curve(result: dict, task: str) -> tuple[list[int], list[float]]:
    entries = sorted(result.get(task) or [], key=lambda e: e["layer"])
    return [int(e["layer"]) for e in entries], [float(e["score"]) for e in entries]


def normalised_curve(result: dict, task: str) -> tuple[list[int], list[float], int, float]:
    """(layers, score / best-layer score, best layer, best score) of one task; all 0 if the best is 0."""
    layers, scores = _curve(result, task)
    if not layers:
        return [], [], 0, float("nan")
    best_i = int(np.nanargmax(scores))
    best = scores[best_i]
    norm = [s / best if best > 0 else 0.0 for s in scores]
    return layers, norm, layers[best_i], best


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def layer_curves_figure(result: dict, title: Optional[str] = None) -> Figure:
    """The layer-wise figure of one probe result (module docstring): exactly one Line2D per task present."""
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    head = result.get("head") or {}
    last = 0
    for task in TASKS:
        layers, norm, best_layer, best = normalised_curve(result, task)
        if not layers:
            continue
        last = max(last, layers[-1])
        ax.plot(layers, norm, marker="o", color=_COLOURS[task],
                label=f"{TASK_LABELS[task]} (best layer {best_layer}: {best:.3f})")
    for task in TASKS:  # head markers after the curves, so ax.lines holds the curves only
        if task in head and head[task] is not None and result.get(task):
            _, _, _, best = normalised_curve(result, task)
            y = head[task] / best if best > 0 else 0.0
            ax.scatter([last + 1], [y], marker="*", s=140, color=_COLOURS[task], zorder=3)
    if last:
        ticks = list(range(1, last + 1)) if last <= 16 else list(range(0, last + 1, max(1, last // 10)))[1:]
        labels = [str(t) for t in ticks]
        if head:
            ticks, labels = ticks + [last + 1], labels + ["head"]
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
    ax.set_xlabel("layer k (output after k blocks)")
    ax.set_ylabel("score / best-layer score")
    ax.set_title(title or result.get("label") or "per-layer frozen-feature probes")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def compare_figure(results: Sequence[dict], labels: Optional[Sequence[str]] = None,
                   normalise: bool = False, title: Optional[str] = None) -> Figure:
    """One panel per task present in any result, one curve per result (raw scores; `normalise` divides
    each curve by its own best layer). Labels default to each result's "label"."""
    if not results:
        raise ValueError("compare_figure needs at least one probe result")
    labels = list(labels) if labels is not None else [r.get("label") or f"export {i}" for i, r in
                                                        enumerate(results)]
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    tasks = [t for t in TASKS if any(r.get(t) for r in results)]
    if not tasks:
        raise ValueError("the probe results hold no scores (no knn, linear or dense entries)")
    fig = new_figure(4.2 * len(tasks), 4.0)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for result, label in zip(results, labels):
            if normalise:
                layers, scores, _, _ = normalised_curve(result, task)
            else:
                layers, scores = _curve(result, task)
            if layers:
                ax.plot(layers, scores, marker="o", label=label)
        ax.set_title(TASK_LABELS[task])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer k")
        ax.set_ylabel("score / best-layer score" if normalise else "score")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: Union[str, os.PathLike]) -> Path:
    """Write `fig` as a PNG atomically (temp file in the same folder, fsync, rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return write_bytes_atomic(path, buf.getvalue())


def figure_rgb(fig: Figure) -> np.ndarray:
    """uint8 [H, W, 3] pixels of `fig` (for TensorBoard's add_image)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
