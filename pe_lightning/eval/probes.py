"""Per-layer frozen-feature probes: features of every requested layer in one forward pass, then kNN, a linear
probe (global features) and a dense 1x1-conv probe (patch tokens), each a pure function of tensors.

Conventions (STAGE_ANCHORS.md section 6 for the public protocols these follow):

* **Layer k** is the output after the first k blocks, 1-based (block index k - 1), the raw residual stream
  as Meta's `forward_features(layer_idx=k)` returns it: no `ln_post` (a truncated PE-Lang / PE-Spatial
  tower has none either). The global feature of a layer is the **mean of its patch tokens** (the class
  token excluded, so towers with and without one compare alike). The extra entry `"head"` is the pooled
  embedding of a model with a pooling head: `visual.forward_head` on the final tokens (`ln_post` applied),
  i.e. exactly `model.encode_image` un-normalised.
* **kNN**: cosine similarity of L2-normalised features, the k = 20 most similar train samples vote with
  weight exp(similarity / T), T = 0.07: DINO's weighted kNN (`eval_knn.py`), the protocol RADIO's
  `knn_classification.py` runs with k = 20. `temperature=None` gives a plain majority vote. Ties go to the
  lowest class index.
* **Linear probe**: multinomial logistic regression on standardised features (mean and std per dimension
  from the training samples only: our choice, so one fixed schedule suits layers whose scales differ by
  orders of magnitude), full-batch L-BFGS (a fixed iteration budget; deterministic). The weight decay
  (L2 penalty wd/2 * ||W||^2 on the weights, none on the bias, added to the mean cross-entropy) is chosen
  from `WEIGHT_DECAYS` on a validation split (20%) carved from the TRAIN split (stratified, seeded): the
  grid runs from the strongest decay to the weakest, each fit warm-started from the previous one (the first
  from zeros); the best validation top-1 wins, ties to the stronger decay. The probe is then refit on the
  whole train split with it. The test split is never used for any choice (CLIP_benchmark's `linear_probe`
  runs the same search with AdamW).
* **Dense probe**: one linear map per token (a 1x1 conv) on standardised patch tokens (train statistics:
  mmseg's BNHead normalises its input with BN; ours is that BN frozen at the train statistics). Trained
  with full-batch L-BFGS from zeros for a fixed number of iterations (deterministic; no weight decay, as
  RADIO's linear probe) against the masks downsampled to the token grid as soft targets (each token's
  class fractions), which equals the per-pixel cross-entropy of nearest-upsampled logits (our choice, at
  1 / patch-area of the cost of mmseg's bilinearly upsampled training logits). Scored as mmseg / RADIO /
  PE's linear ADE20k probes are: **logits upsampled bilinearly (align_corners=False) to the full mask
  size**, argmax, mIoU.
* **mIoU**: mmsegmentation's convention. Intersection and union per class are summed over every pixel of the
  whole test set, IoU = intersection / union, and the mean is over the classes whose union is non-empty
  (present in the target or in the prediction); pixels whose target is `ignore_index` are not counted.

Scores are fractions in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["LayerFeatures", "extract_layer_features", "check_layers", "knn_probe", "linear_probe",
           "linear_probe_fit", "LinearProbeResult", "dense_probe", "dense_probe_fit", "DenseProbeResult",
           "miou", "class_iou", "confusion_matrix", "soft_token_targets", "has_pooling_head", "HEAD",
           "WEIGHT_DECAYS"]

HEAD = "head"  # the key of the pooled-embedding entry
WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # our choice: the linear probe's search grid
Layer = Union[int, str]


# ----------------------------------------------------------------------------------------------------------
# features

@dataclass
class LayerFeatures:
    """Frozen features of one data split, on the CPU.

    pooled: layer k -> [N, W] mean patch token; `"head"` -> [N, out] pooled embedding (when there is one).
    maps: layer k -> [N, W, grid_h, grid_w] patch tokens (empty when not kept).
    labels: [N] long class labels, masks: [N, H, W] per-pixel targets, each None when the loader had none.
    """

    pooled: dict[Layer, torch.Tensor]
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    labels: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None
    grid: tuple[int, int] = (0, 0)

    @property
    def layers(self) -> list[int]:
        return sorted(k for k in self.pooled if isinstance(k, int))

    def __len__(self) -> int:
        return next(iter(self.pooled.values())).shape[0] if self.pooled else 0


def check_layers(layers: Optional[Iterable[int]], depth: int) -> list[int]:
    """Sorted unique 1-based layers (None = all 1..depth); ValueError naming the valid range otherwise."""
    if layers is None:
        return list(range(1, depth + 1))
    out = sorted({int(k) for k in layers})
    bad = [k for k in out if not 1 <= k <= depth]
    if bad or not out:
        raise ValueError(f"layers {bad or '[]'} are not in 1..{depth} (layer k = the output after k blocks of "
                         f"this {depth}-block tower)")
    return out


def has_pooling_head(visual: Any) -> bool:
    """True for a tower whose `forward_head` pools the tokens (attention pooling, or the class token)."""
    return getattr(visual, "attn_pool", None) is not None or getattr(visual.cfg, "pool_type", "none") == "tok"


def _unpack(batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(images, labels or None, masks or None) of a batch: (images, labels[, masks]) or a dict with "image"
    and optionally "label" and "mask" (or "semantic", as `load_mask_set` yields)."""
    if isinstance(batch, dict):
        images = batch["image"]
        labels = batch.get("label")
        masks = batch.get("mask", batch.get("semantic"))
        return images, labels, masks
    if isinstance(batch, (tuple, list)):
        if not 1 <= len(batch) <= 3:
            raise ValueError(f"expected batches (images, labels[, masks]), got a {len(batch)}-tuple")
        items = list(batch) + [None] * (3 - len(batch))
        return items[0], items[1], items[2]
    return batch, None, None


def extract_layer_features(visual: Any, loader: Iterable, layers: Optional[Sequence[int]] = None,
                           device: Union[str, torch.device, None] = None, *, keep_maps: bool = True,
                           maps_dtype: torch.dtype = torch.float32) -> LayerFeatures:
    """One forward pass per image through `visual.forward_intermediates` for all `layers` (1-based; None =
    every layer), collected on the CPU. `visual` is a `VisionTransformer` (or a model with `.visual`).

    Per layer: the mean patch token [N, W] and (keep_maps) the patch-token maps [N, W, gh, gw] stored as
    `maps_dtype`. When the last layer is requested and the tower has a pooling head, also `pooled["head"]`
    = `forward_head(final tokens)`. The tower runs in eval mode under no_grad (its mode is restored)."""
    visual = getattr(visual, "visual", visual)
    depth = visual.layers
    layers = check_layers(layers, depth)
    want_head = depth in layers and has_pooling_head(visual)
    device = torch.device(device) if device is not None else next(visual.parameters()).device
    pooled: dict[Layer, list[torch.Tensor]] = {k: [] for k in layers}
    if want_head:
        pooled[HEAD] = []
    maps: dict[int, list[torch.Tensor]] = {k: [] for k in layers} if keep_maps else {}
    labels, masks, grid = [], [], (0, 0)
    was_training = visual.training
    visual.train(False)
    try:
        # no_grad, not inference_mode: the probes train on these tensors afterwards
        with torch.no_grad():
            for batch in loader:
                images, y, m = _unpack(batch)
                final, inters = visual.forward_intermediates(images.to(device), indices=[k - 1 for k in layers],
                                                             output_fmt="NCHW", stop_early=not want_head)
                for k, fmap in zip(layers, inters):
                    pooled[k].append(fmap.float().mean(dim=(2, 3)).cpu())
                    if keep_maps:
                        maps[k].append(fmap.to(maps_dtype).cpu())
                    grid = tuple(fmap.shape[-2:])
                if want_head:
                    pooled[HEAD].append(visual.forward_head(final).float().cpu())
                if y is not None:
                    labels.append(torch.as_tensor(y).long().cpu())
                if m is not None:
                    masks.append(torch.as_tensor(m).cpu())
    finally:
        visual.train(was_training)
    if not any(pooled.values()) or not pooled[layers[0]]:
        raise ValueError("extract_layer_features: the loader yielded no images")
    return LayerFeatures(pooled={k: torch.cat(v) for k, v in pooled.items()},
                         maps={k: torch.cat(v) for k, v in maps.items()},
                         labels=torch.cat(labels) if labels else None,
                         masks=torch.cat(masks) if masks else None, grid=grid)


# ----------------------------------------------------------------------------------------------------------
# global probes

def _check_xy(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{what}: expected features [N, D] and labels [N] with N > 0, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


def _num_classes(num_classes: Optional[int], *labels: torch.Tensor) -> int:
    return int(num_classes) if num_classes is not None else int(max(int(y.max()) for y in labels)) + 1


def _top1(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred.cpu() == target.cpu()).float().mean())


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              k: int = 20, temperature: Optional[float] = 0.07, num_classes: Optional[int] = None,
              chunk: int = 1024) -> float:
    """Top-1 of a cosine kNN classifier (module docstring): DINO's weighted vote, exp(sim / temperature),
    over the k most similar train samples (k capped at the train size); temperature=None = majority vote."""
    _check_xy(train_x, train_y, "knn_probe train")
    _check_xy(test_x, test_y, "knn_probe test")
    n_cls = _num_classes(num_classes, train_y, test_y)
    k = max(1, min(int(k), train_x.shape[0]))
    train = F.normalize(train_x.float(), dim=-1)
    train_y = train_y.to(train.device).long()
    preds = []
    for start in range(0, test_x.shape[0], chunk):
        query = F.normalize(test_x[start:start + chunk].float().to(train.device), dim=-1)
        sim, idx = (query @ train.T).topk(k, dim=-1)
        weight = torch.ones_like(sim) if temperature is None else (sim / temperature).exp()
        votes = torch.zeros(query.shape[0], n_cls, device=train.device)
        votes.scatter_add_(1, train_y[idx], weight)
        preds.append(votes.argmax(dim=-1))  # ties -> the first maximal index (lowest class)
    return _top1(torch.cat(preds), test_y)


@dataclass
class LinearProbeResult:
    top1: float  # on the test split
    weight_decay: float  # chosen on the validation split carved from train
    val_top1: dict[float, float]  # weight decay -> validation top-1 of the search


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per dimension of the last axis; std floored so constant dimensions map to 0."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return flat.mean(dim=0), flat.std(dim=0, unbiased=False).clamp_min(1e-6)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.ndim == 2:
        return -(y * F.log_softmax(logits, dim=-1)).sum() / y.sum().clamp_min(1e-12)
    return F.cross_entropy(logits, y)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_cls: int, weight_decay: float, max_iter: int,
                  init: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS from `init` (default zeros): (W [D, C], b [C]).
    y: [N] class ids, or [N, C] soft targets (loss = -sum(y * log_softmax) / sum(y): per unit of target mass)."""
    if init is None:
        init = (torch.zeros(x.shape[1], n_cls, device=x.device), torch.zeros(n_cls, device=x.device))
    weight, bias = (t.detach().clone().requires_grad_(True) for t in init)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def _stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, validation indices): `fraction` of each class (at least one where a class has two or
    more samples, none where it has one), drawn with a seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    y = y.cpu()
    fit, val = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = 0 if len(idx) < 2 else max(1, int(round(fraction * len(idx))))
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def linear_probe_fit(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     *, num_classes: Optional[int] = None, weight_decays: Sequence[float] = WEIGHT_DECAYS,
                     val_fraction: float = 0.2, max_iter: int = 100, seed: int = 0) -> LinearProbeResult:
    """The linear probe of the module docstring: weight decay chosen on a validation split of TRAIN (ties go
    to the larger decay), refit on all of train, top-1 on test."""
    _check_xy(train_x, train_y, "linear_probe train")
    _check_xy(test_x, test_y, "linear_probe test")
    n_cls = _num_classes(num_classes, train_y, test_y)
    train_x, test_x = train_x.float(), test_x.float().to(train_x.device)
    train_y = train_y.long().to(train_x.device)
    decays = sorted((float(w) for w in weight_decays), reverse=True)
    fit_idx, val_idx = _stratified_split(train_y, val_fraction, seed)
    val_top1: dict[float, float] = {}
    init = None
    if len(decays) > 1 and len(val_idx) > 0:
        fit_idx, val_idx = fit_idx.to(train_x.device), val_idx.to(train_x.device)
        fx, fy, vx, vy = train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx]
        mean, std = _standardiser(fx)
        solutions = {}
        for wd in decays:  # strongest decay first, each fit warm-started from the previous (a path)
            init = solutions[wd] = _fit_logistic((fx - mean) / std, fy, n_cls, wd, max_iter, init)
            val_top1[wd] = _top1(((vx - mean) / std @ init[0] + init[1]).argmax(-1), vy)
        best = max(val_top1.values())
        chosen = max(wd for wd, acc in val_top1.items() if acc == best)
        init = solutions[chosen]
    else:
        chosen = decays[-1]
    mean, std = _standardiser(train_x)
    w, b = _fit_logistic((train_x - mean) / std, train_y, n_cls, chosen, max_iter, init)
    top1 = _top1(((test_x - mean) / std @ w + b).argmax(-1), test_y)
    return LinearProbeResult(top1=top1, weight_decay=chosen, val_top1=val_top1)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 **kwargs: Any) -> float:
    """Test top-1 of `linear_probe_fit` (same arguments)."""
    return linear_probe_fit(train_x, train_y, test_x, test_y, **kwargs).top1


# ----------------------------------------------------------------------------------------------------------
# dense probe and mIoU

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: Optional[int] = None) -> torch.Tensor:
    """[C, C] int64 counts, rows = target class, columns = predicted class; target pixels equal to
    `ignore_index` (or outside [0, C)) are not counted."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in size: {pred.numel()} vs {target.numel()}")
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


def _iou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def class_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
              ignore_index: Optional[int] = None) -> torch.Tensor:
    """[C] float64 IoU per class over all pixels; NaN where a class is in neither target nor prediction."""
    return _iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: Optional[int] = None) -> float:
    """Mean IoU (mmseg convention, module docstring): mean over classes with a non-empty union; NaN if none."""
    iou = class_iou(pred, target, num_classes, ignore_index)
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


@dataclass
class DenseProbeResult:
    miou: float  # on the test split
    class_iou: list[Optional[float]]  # per class; None where the class is in neither target nor prediction
    final_loss: float  # training cross-entropy (per pixel) at the end of the fit


def soft_token_targets(masks: torch.Tensor, num_classes: int, grid: tuple[int, int],
                       ignore_index: Optional[int] = None) -> torch.Tensor:
    """[N, C, gh, gw] fraction of each token's pixels in each class (masks [N, H, W] area-averaged to the token
    grid; ignored pixels count for no class, so a token's fractions may sum to less than 1)."""
    masks = masks.long()
    keep = (masks >= 0) & (masks < num_classes)
    if ignore_index is not None:
        keep &= masks != ignore_index
    masks = torch.where(keep, masks, -1)
    # one class at a time: a one-hot [N, C, H, W] of large masks would not fit in memory
    return torch.stack([F.adaptive_avg_pool2d((masks == c).float().unsqueeze(1), grid)[:, 0]
                        for c in range(num_classes)], dim=1)


def dense_probe_fit(train_maps: torch.Tensor, train_masks: torch.Tensor, test_maps: torch.Tensor,
                    test_masks: torch.Tensor, num_classes: int, *, max_iter: int = 50, weight_decay: float = 0.0,
                    ignore_index: int = 255, eval_batch_size: int = 64) -> DenseProbeResult:
    """The dense probe of the module docstring. maps [N, D, gh, gw]; masks [N, H, W] integer class ids
    (`ignore_index` = not counted). Returns the test mIoU, the per-class IoU and the final training loss.

    Training: every train token is one sample of a linear (1x1-conv) softmax classifier on standardised
    features, fitted by full-batch L-BFGS (`max_iter` iterations from zeros: a fixed, deterministic schedule)
    against soft targets: the masks downsampled to the token grid as the fraction of the token's pixels in
    each class. That loss is exactly the per-pixel cross-entropy of the logits upsampled to the mask with
    nearest neighbour, at 1 / (patch area) of its cost (our choice, for speed; mmseg trains on bilinearly
    upsampled logits with SGD/AdamW). Scoring, as mmseg: logits upsampled bilinearly (align_corners=False) to
    the full mask size, argmax, mIoU over the test set."""
    for what, maps, masks in (("train", train_maps, train_masks), ("test", test_maps, test_masks)):
        if maps.ndim != 4 or masks.ndim != 3 or maps.shape[0] != masks.shape[0] or maps.shape[0] == 0:
            raise ValueError(f"dense_probe {what}: expected maps [N, D, gh, gw] and masks [N, H, W] with N > 0, "
                             f"got {tuple(maps.shape)} and {tuple(masks.shape)}")
    device, dim = train_maps.device, train_maps.shape[1]
    tokens = train_maps.movedim(1, -1).reshape(-1, dim).float()
    mean, std = _standardiser(tokens)
    targets = soft_token_targets(train_masks.to(device), num_classes, tuple(train_maps.shape[-2:]), ignore_index)
    targets = targets.movedim(1, -1).reshape(-1, num_classes)
    tokens = (tokens - mean) / std
    weight, bias = _fit_logistic(tokens, targets, num_classes, weight_decay, max_iter)
    final_loss = float(_cross_entropy(tokens @ weight + bias, targets))
    del tokens, targets
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, test_maps.shape[0], eval_batch_size):
            maps = test_maps[start:start + eval_batch_size].to(device).movedim(1, -1).float()
            target = test_masks[start:start + eval_batch_size].to(device)
            logits = (((maps - mean) / std) @ weight + bias).movedim(-1, 1)
            logits = F.interpolate(logits, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
            conf += confusion_matrix(logits.argmax(dim=1), target, num_classes, ignore_index)
    iou = _iou_from_confusion(conf)
    present = ~torch.isnan(iou)
    return DenseProbeResult(miou=float(iou[present].mean()) if present.any() else float("nan"),
                            class_iou=[None if math.isnan(v) else float(v) for v in iou.tolist()],
                            final_loss=final_loss)


def dense_probe(train_maps: torch.Tensor, train_masks: torch.Tensor, test_maps: torch.Tensor,
                test_masks: torch.Tensor, num_classes: int, **kwargs: Any) -> float:
    """Test mIoU of `dense_probe_fit` (same arguments)."""
    return dense_probe_fit(train_maps, train_masks, test_maps, test_masks, num_classes, **kwargs).miou
