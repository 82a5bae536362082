"""The CLIP figures of a model on a recipe's eval sets: zero-shot on every `eval.zeroshot` folder, retrieval on
every `eval.retrieval` set. Shared by the clip_eval callback (during and after training) and `pe-lightning eval`
(an export on other sets, e.g. a validation world generated with another seed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pe_lightning.data.classification import load_classification_set
from pe_lightning.data.retrieval import load_retrieval_set
from pe_lightning.data.transforms import resize_to
from pe_lightning.eval.retrieval import retrieval_eval
from pe_lightning.eval.zeroshot import build_zeroshot_classifier, zeroshot_eval
from pe_lightning.models.tokenizer import get_tokenizer


def clip_figures(model: torch.nn.Module, cfg, resolution: int, device: torch.device,
                 limit: Optional[int] = None) -> dict[str, float]:
    """zeroshot_<set>_* and retrieval_<set>_* for every set, the first set of each kind also without its name
    (the headline keys), images resized to `resolution` (the model's last training resolution)."""
    ev = cfg.eval
    tokenize = get_tokenizer(model.context_length)
    preprocess = lambda images: resize_to(images.to(device), resolution)  # noqa: E731
    metrics: dict[str, float] = {}
    for index, entry in enumerate(ev.zeroshot):
        loader, classnames, templates = load_classification_set(entry.path, cfg.data.image_size, ev.batch_size,
                                                                limit=limit)
        heldout = _read_lines(entry.heldout_classes) if entry.heldout_classes else None
        classifier = build_zeroshot_classifier(model, tokenize, classnames, templates, device)
        result = zeroshot_eval(model, loader, classifier, classnames, heldout=heldout,
                               factor_names=list(ev.factor_names) or None, preprocess=preprocess)
        metrics.update(_prefixed(result, f"zeroshot_{entry.name}_"))
        if index == 0:
            metrics.update(_prefixed(result, "zeroshot_"))
    for index, entry in enumerate(ev.retrieval):
        loader = load_retrieval_set(entry.path, cfg.data.image_size, ev.batch_size, limit=limit)
        result = retrieval_eval(model, loader, tokenize, device, preprocess=preprocess)
        metrics.update(_prefixed(result, f"retrieval_{entry.name}_"))
        if index == 0:
            metrics.update(_prefixed(result, "retrieval_"))
    return metrics


def missing_sets(cfg) -> list[str]:
    """`name: path` of every eval set whose folder does not exist."""
    return [f"{entry.name}: {entry.path}" for entry in [*cfg.eval.zeroshot, *cfg.eval.retrieval]
            if not Path(entry.path).exists()]


def _prefixed(result: dict, prefix: str) -> dict[str, float]:
    return {prefix + key: float(value) for key, value in result.items()}


def _read_lines(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
