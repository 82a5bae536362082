"""Zero-shot classification: class names x prompt templates -> text classifier, then top-k accuracy,
held-out-class accuracy and per-factor accuracy for compositional class names ("red circle").

The model needs `encode_image(images) -> [B, D]` and `encode_text(tokens) -> [N, D]` (un-normalised);
both are L2-normalised here.
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["build_zeroshot_classifier", "zeroshot_eval", "class_factors"]

Template = Union[str, Callable[[str], str]]
ClassName = Union[str, Sequence[str]]


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put `model` in eval mode (if it is an nn.Module) for the block, then restore its previous mode."""
    was_training = getattr(model, "training", None)
    if was_training is not None and hasattr(model, "train"):
        model.train(False)
    try:
        yield
    finally:
        if was_training is not None and hasattr(model, "train"):
            model.train(was_training)


def _display(name: ClassName) -> str:
    return name if isinstance(name, str) else " ".join(name)


def _fill(template: Template, classname: str) -> str:
    """CLIP_benchmark template files write `{c}`; open_clip's templates are callables; `{}` also works."""
    if callable(template):
        return template(classname)
    return template.replace("{c}", classname).replace("{}", classname)


def build_zeroshot_classifier(
    model: Any,
    tokenize: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[ClassName],
    templates: Sequence[Template],
    device: Union[str, torch.device, None] = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot text classifier [C, D], as CLIP builds it.

    For each class, every template is filled in (`"a photo of a {}."`.format(name), or a callable template
    `t(name)` as in open_clip), embedded with `model.encode_text`, L2-normalised; the class weight is the
    mean of these, re-normalised. Class names given as tuples of factors are joined with spaces.
    Texts are encoded in batches of `batch_size` under `torch.inference_mode`.
    """
    if not classnames or not templates:
        raise ValueError("build_zeroshot_classifier needs at least one class name and one template")
    texts = [_fill(t, _display(c)) for c in classnames for t in templates]
    embs = []
    with torch.inference_mode(), eval_mode(model):
        for start in range(0, len(texts), batch_size):
            tokens = tokenize(texts[start:start + batch_size])
            if device is not None:
                tokens = tokens.to(device)
            embs.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    emb = torch.cat(embs).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def class_factors(classnames: Sequence[ClassName]) -> Optional[list[tuple[str, ...]]]:
    """Split class names into factors: tuples as given, strings on whitespace. None unless every class has
    the same number (>= 2) of factors."""
    parts = [tuple(c) if not isinstance(c, str) else tuple(c.split()) for c in classnames]
    counts = {len(p) for p in parts}
    if len(counts) != 1 or counts.pop() < 2:
        return None
    return parts


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        img = batch.get("image", batch.get("images"))
        lab = batch.get("label", batch.get("labels", batch.get("target")))
        if img is None or lab is None:
            raise ValueError(f"zeroshot_eval: dict batch needs 'image' and 'label' keys, got {list(batch)}")
        return img, torch.as_tensor(lab)
    images, labels = batch[0], batch[1]
    return images, torch.as_tensor(labels)


def _heldout_indices(heldout: Iterable[Union[int, ClassName]], classnames: Sequence[ClassName]) -> set[int]:
    index = {_display(c): i for i, c in enumerate(classnames)}
    out = set()
    for h in heldout:
        if isinstance(h, numbers.Integral):
            h = int(h)
            if not 0 <= h < len(classnames):
                raise ValueError(f"held-out class index {h} out of range [0, {len(classnames)})")
            out.add(h)
        else:
            name = _display(h)
            if name not in index:
                raise ValueError(f"held-out class {name!r} is not one of the class names")
            out.add(index[name])
    return out


def zeroshot_eval(
    model: Any,
    loader: Iterable[Any],
    classifier: torch.Tensor,
    classnames: Sequence[ClassName],
    heldout: Optional[Iterable[Union[int, ClassName]]] = None,
    factors: bool = True,
    factor_names: Optional[Sequence[str]] = None,
    preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, float]:
    """Zero-shot accuracy of `model` on `loader` against `classifier` ([C, D], rows = classes).

    `loader` yields (images, labels) pairs (or dicts with 'image' and 'label'), labels being class indices.
    Images are moved to the classifier's device, passed through `preprocess` if given (e.g. an eval-time
    resize on the device), embedded with `model.encode_image`, normalised and scored against all C classes.

    Returns (fractions in [0, 1]):
      - `top1`, `top5` (top-k with k = min(5, C)).
      - with `heldout` (class names or indices): `heldout_top1` (top-1 on samples whose true class is held
        out) and `seen_top1` (on the others); predictions are always over **all** classes (the generalised
        setting). A key is omitted when its subset has no samples.
      - with `factors` and class names of a consistent number (>= 2) of words (or tuples): per-factor
        accuracy, i.e. whether the predicted class agrees with the true class in factor f, as `factor{f}_acc`
        or `{factor_names[f]}_acc`; also `heldout_{...}_acc` on the held-out subset.
        Passing `factor_names` that do not fit the class names is an error.
    """
    classifier = classifier.float()
    device = classifier.device
    num_classes = len(classnames)
    if classifier.ndim != 2 or classifier.shape[0] != num_classes:
        raise ValueError(
            f"zeroshot_eval: classifier {tuple(classifier.shape)} does not match {num_classes} class names"
        )
    k5 = min(5, num_classes)
    preds, labels_all = [], []
    with torch.inference_mode(), eval_mode(model):
        for batch in loader:
            images, labels = _split_batch(batch)
            images = images.to(device)
            if preprocess is not None:
                images = preprocess(images)
            feats = F.normalize(model.encode_image(images).float(), dim=-1)
            logits = feats @ classifier.t()
            preds.append(logits.topk(k5, dim=-1).indices.cpu())
            labels_all.append(labels.reshape(-1).long().cpu())
    if not preds:
        raise ValueError("zeroshot_eval: the loader yielded no batches")
    topk = torch.cat(preds)  # [N, k5]
    labels = torch.cat(labels_all)
    if labels.numel() != topk.shape[0]:
        raise ValueError(f"zeroshot_eval: {labels.numel()} labels for {topk.shape[0]} images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"zeroshot_eval: labels must lie in [0, {num_classes})")
    top1 = topk[:, 0]
    correct1 = top1 == labels
    out: dict[str, float] = {
        "top1": correct1.float().mean().item(),
        "top5": (topk == labels[:, None]).any(dim=1).float().mean().item(),
    }

    held_mask = None
    if heldout is not None:
        held = _heldout_indices(heldout, classnames)
        held_mask = torch.tensor([int(l) in held for l in labels.tolist()], dtype=torch.bool)
        if held_mask.any():
            out["heldout_top1"] = correct1[held_mask].float().mean().item()
        if (~held_mask).any():
            out["seen_top1"] = correct1[~held_mask].float().mean().item()

    parts = class_factors(classnames) if (factors or factor_names is not None) else None
    if factor_names is not None:
        if parts is None or len(parts[0]) != len(factor_names):
            raise ValueError(
                f"zeroshot_eval: factor_names {list(factor_names)} do not fit the class names "
                "(each needs the same number of words as there are factor names)"
            )
    if parts is not None:
        nf = len(parts[0])
        names = list(factor_names) if factor_names is not None else [f"factor{f}" for f in range(nf)]
        for f, fname in enumerate(names):
            # map each class to the id of its value in factor f, then compare predicted vs true value
            values = {v: j for j, v in enumerate(sorted({p[f] for p in parts}))}
            value_of = torch.tensor([values[p[f]] for p in parts])
            agree = value_of[top1] == value_of[labels]
            out[f"{fname}_acc"] = agree.float().mean().item()
            if held_mask is not None and held_mask.any():
                out[f"heldout_{fname}_acc"] = agree[held_mask].float().mean().item()
    return out
