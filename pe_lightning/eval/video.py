"""Video evaluation with the frame mean: video <-> text retrieval (R@1/5/10) and video zero-shot classification
of the shapes world's moving object (colour x shape), its motion (8 classes) and the motion's axis (5 classes).

Pooling (Meta's zero-shot path, `CLIP.encode_video(normalize=False)` then `F.normalize`): each of the N
uniformly sampled frames (Meta's index rule, data/video_text.py) goes through the image tower, the
**un-normalised** frame embeddings are averaged over frames, and the mean is L2-normalised. Both tasks use this
one pooling, the one the video stage trains with. (Meta's clip_benchmark retrieval instead calls
`encode_video(normalize=True)`: the mean of per-frame normalised embeddings, not re-normalised. Its direction
differs from ours when frame norms differ, and its length, which varies per clip, also enters t2v rankings.)

What mean pooling cannot see: the mean is order-free, so a clip and the same clip played backwards get the
same embedding (up to which frames the index rule picks). In the shapes world a clip "moving to the left" and
one "moving to the right" over the same path contain the same frames in reverse order, and left and right
start positions are drawn from the same range: a frame-mean model can only guess between them, and likewise
between up / down and between grow / shrink. We measure it rather than hide it: `video_motion_<m>_acc` per
motion, and `video_motion_swap_lr` / `_ud` / `_gs`, the fraction of left+right (up+down, grow+shrink) clips
predicted as the *opposite* member of their pair (an order-blind model that gets the axis right still
picks the wrong direction about half the time, so its swap rate is about its accuracy on the pair).
The axis task (horizontal / vertical / scale / recolour / still) is the order-free question the mean can answer.

Subsets (the shapes world's `.json` has `tracks`, see data/shapes/motion.py): retrieval uses every clip;
the three zero-shot tasks use only **single-track** clips (a two-track clip has two objects and two motions,
so one label would be ambiguous); colour x shape also leaves out `recolour` clips (the colour changes
mid-clip). Clips without shapes-world metadata (your own shards) count for retrieval only, and the zero-shot
keys are then absent.

Retrieval ties and duplicates: as Meta's clip_benchmark, clips with the *same caption string* are all positives
of each other's captions (identical captions are indistinguishable on the text side; the shapes world has
many); a hit at k means a positive ranks within the top k; ties count against the query (the rank of the
best positive is the number of negatives scoring >= it), so a collapsed model gets ~0. With unique
captions this is exactly `eval.retrieval.recall_at_k`.

Class embeddings (as `eval.zeroshot.build_zeroshot_classifier`): the mean of the L2-normalised embeddings of
a class's prompts, re-normalised. Prompts are in the caption style (`Track.phrase`): colour x shape classes
with one template per motion ("a red circle moving up."); motion classes with every training colour-shape
("a red circle moving up.", "a red square moving up.", ...), i.e. the object is averaged out; an axis class
pools the prompts of its motions (horizontal = left + right, vertical = up + down, scale = grow + shrink).

    loader = load_video_eval_set("data/shapes/video/test", image_size=64, num_frames=8, batch_size=32)
    metrics = video_eval(model, loader, tokenize, device)   # {"video_t2v_r1": ..., "video_axis_top1": ...}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pe_lightning.data.classification import EvalShardDataset, resolve_benchmark
from pe_lightning.data.config import AugmentConfig
from pe_lightning.data.shapes.motion import MOTIONS, Track
from pe_lightning.data.shapes.scenes import CLASSES, COLOURS, SHAPES, TRAIN_PAIRS, Obj, class_index
from pe_lightning.data.video_text import VideoTextDecoder

from .zeroshot import eval_mode

log = logging.getLogger(__name__)

__all__ = ["AXES", "MOTION_AXIS", "SWAP_PAIRS", "load_video_eval_set", "encode_clips", "multi_positive_recall",
           "class_prompts", "class_embeddings", "video_eval", "VideoEmbeddings"]

AXES = ("horizontal", "vertical", "scale", "recolour", "still")
MOTION_AXIS = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical",
               "grow": "scale", "shrink": "scale", "recolour": "recolour", "still": "still"}
SWAP_PAIRS = {"lr": ("left", "right"), "ud": ("up", "down"), "gs": ("grow", "shrink")}  # order-free twins
_NO_LABEL = -1
Tokenize = Callable[[list[str]], torch.Tensor]


# ---------------- the eval set ----------------

def _labels(raw: dict) -> dict[str, int]:
    """Shapes-world labels of the first track (-1 where the json is absent or foreign)."""
    out = {"colour_shape": _NO_LABEL, "motion": _NO_LABEL, "axis": _NO_LABEL, "tracks": 0}
    try:
        tracks = json.loads(raw["json"].decode("utf-8")).get("tracks") or []
        first = tracks[0]
        out["tracks"] = len(tracks)
        if first.get("colour") in COLOURS and first.get("shape") in SHAPES:
            out["colour_shape"] = class_index(first["colour"], first["shape"])
        if first.get("motion") in MOTIONS:
            out["motion"] = MOTIONS.index(first["motion"])
            out["axis"] = AXES.index(MOTION_AXIS[first["motion"]])
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        pass  # no usable metadata: the clip still counts for retrieval
    return out


def _collate(items: list[dict]) -> dict:
    out: dict[str, Any] = {"video": torch.stack([i["video"] for i in items]),
                           "caption": [i["caption"] for i in items]}
    for k in ("colour_shape", "motion", "axis", "tracks"):
        out[k] = torch.tensor([i[k] for i in items], dtype=torch.long)
    return out


def load_video_eval_set(path: Union[str, Path], image_size: int, num_frames: int, batch_size: int,
                        limit: Optional[int] = None, workers: int = 0) -> DataLoader:
    """Held-out video2dataset shards (`.mp4` + `.txt` + `.json`) -> a loader of dict batches:
    {"video": float [B, N, 3, S, S] (uniform frames, Meta's squash resize, mean = std = 0.5),
     "caption": list of B str, "colour_shape" / "motion" / "axis": long [B] (class indices into CLASSES /
     MOTIONS / AXES of the first track, -1 without shapes-world metadata), "tracks": long [B]}.
    Undecodable or empty clips are skipped and counted in `loader.dataset.skipped` (exact with workers=0)."""
    shards, _ = resolve_benchmark(path, split="test")
    decoder = VideoTextDecoder(image_size, num_frames, AugmentConfig(enabled=False), tokenize=None, seed=0,
                               train=False)

    def fn(raw: dict) -> dict:
        item = decoder.decode(raw, 0)  # raises SkipSample (bad_video, missing_video, empty_caption, ...)
        return {**item, "caption": item["caption"].strip(), **_labels(raw)}

    ds = EvalShardDataset(shards, fn, limit=limit, name=str(path))
    return DataLoader(ds, batch_size=batch_size, num_workers=min(workers, len(shards)), collate_fn=_collate)


# ---------------- embeddings ----------------

@dataclass
class VideoEmbeddings:
    """Everything `video_eval` scores: L2-normalised video [N, D] and caption [N, D] embeddings, labels."""

    video: torch.Tensor
    text: torch.Tensor
    captions: list[str]
    colour_shape: torch.Tensor
    motion: torch.Tensor
    axis: torch.Tensor
    tracks: torch.Tensor


def _frame_mean(model: Any, frames: torch.Tensor) -> torch.Tensor:
    """[B, N, 3, S, S] -> un-normalised mean of the frame embeddings [B, D]."""
    if hasattr(model, "encode_video"):
        return model.encode_video(frames, normalize=False)
    b, n = frames.shape[:2]
    return model.encode_image(frames.flatten(0, 1)).view(b, n, -1).mean(dim=1)


def encode_clips(model: Any, loader: Any, tokenize: Tokenize, device: Union[str, torch.device, None] = None,
                 preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> VideoEmbeddings:
    """Embed every clip (frame mean, then normalised) and its caption. `preprocess` runs on the frames
    flattened to [B*N, 3, S, S] on the device (e.g. an eval-time resize)."""
    vids, txts, caps = [], [], []
    labels: dict[str, list[torch.Tensor]] = {"colour_shape": [], "motion": [], "axis": [], "tracks": []}
    with torch.inference_mode(), eval_mode(model):
        for batch in loader:
            frames = batch["video"]
            if device is not None:
                frames = frames.to(device)
            if preprocess is not None:
                b, n = frames.shape[:2]
                flat = preprocess(frames.flatten(0, 1))
                frames = flat.view(b, n, *flat.shape[1:])
            tokens = torch.as_tensor(tokenize(list(batch["caption"])))
            if device is not None:
                tokens = tokens.to(device)
            vids.append(F.normalize(_frame_mean(model, frames).float(), dim=-1).cpu())
            txts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
            caps += list(batch["caption"])
            for k in labels:
                labels[k].append(torch.as_tensor(batch.get(k, torch.full((frames.shape[0],), _NO_LABEL))).long())
    if not vids:
        raise ValueError("video_eval: the loader yielded no clips (all skipped? see the data warnings)")
    return VideoEmbeddings(video=torch.cat(vids), text=torch.cat(txts), captions=caps,
                           **{k: torch.cat(v) for k, v in labels.items()})


# ---------------- retrieval ----------------

def multi_positive_recall(video_emb: torch.Tensor, text_emb: torch.Tensor, positive: torch.Tensor,
                          ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k from normalised video [N, D] and text [M, D] embeddings and positive [N, M] (bool).

    v2t: a video is a hit at k if one of its positive texts ranks in the top k texts; t2v: a text is a hit if
    one of its positive videos ranks in the top k videos. Rank = negatives scoring >= the best positive (ties
    count against). Returns {"v2t_r{k}", "t2v_r{k}"}; fractions in [0, 1]."""
    if not positive.any(dim=1).all() or not positive.any(dim=0).all():
        raise ValueError("multi_positive_recall: every video and every text needs at least one positive")
    sim = video_emb.float() @ text_emb.float().t()  # one matrix: both directions compare the same numbers
    neg_inf = torch.tensor(float("-inf"))
    best_text = torch.where(positive, sim, neg_inf).amax(dim=1, keepdim=True)  # [N, 1]
    best_video = torch.where(positive, sim, neg_inf).amax(dim=0, keepdim=True)  # [1, M]
    v2t_rank = ((sim >= best_text) & ~positive).sum(dim=1)
    t2v_rank = ((sim >= best_video) & ~positive).sum(dim=0)
    out = {f"v2t_r{k}": (v2t_rank < k).float().mean().item() for k in ks}
    out.update({f"t2v_r{k}": (t2v_rank < k).float().mean().item() for k in ks})
    return out


def same_caption(captions: Sequence[str]) -> torch.Tensor:
    """positive [N, N]: clip i's video and clip j's caption match when the caption strings are equal."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    idx = torch.tensor([ids[c] for c in captions])
    return idx[:, None] == idx[None, :]


# ---------------- zero-shot ----------------

def _obj(colour: str, shape: str) -> Obj:
    return Obj(shape=shape, colour=colour, size="small", cx=0.0, cy=0.0, r=1.0)


def _phrases(colour: str, shape: str, motion: str) -> list[str]:
    """The caption phrase(s) of an object doing `motion` (recolour: every training target colour)."""
    if motion != "recolour":
        return [Track(obj=_obj(colour, shape), motion=motion).phrase() + "."]
    targets = sorted({c for c, s in TRAIN_PAIRS if s == shape and c != colour})
    return [Track(obj=_obj(colour, shape), motion=motion, colour_to=t).phrase() + "." for t in targets]


def class_prompts() -> dict[str, list[list[str]]]:
    """The prompts of each task's classes, in class order: {"colour_shape": 48 lists, "motion": 8, "axis": 5}."""
    one_colour = [m for m in MOTIONS if m != "recolour"]  # recolour adds a second colour word: left out
    colour_shape = [[Track(obj=_obj(*c.split()), motion=m).phrase() + "." for m in one_colour] for c in CLASSES]
    motion = [[p for c, s in TRAIN_PAIRS for p in _phrases(c, s, m)] for m in MOTIONS]
    axis = [[p for m, prompts in zip(MOTIONS, motion) if MOTION_AXIS[m] == ax for p in prompts] for ax in AXES]
    return {"colour_shape": colour_shape, "motion": motion, "axis": axis}


def class_embeddings(model: Any, tokenize: Tokenize, prompts: Sequence[Sequence[str]],
                     device: Union[str, torch.device, None] = None, batch_size: int = 256) -> torch.Tensor:
    """[C, D]: per class, the mean of its prompts' L2-normalised text embeddings, re-normalised."""
    unique = list(dict.fromkeys(p for group in prompts for p in group))
    embs = []
    with torch.inference_mode(), eval_mode(model):
        for start in range(0, len(unique), batch_size):
            tokens = torch.as_tensor(tokenize(unique[start:start + batch_size]))
            if device is not None:
                tokens = tokens.to(device)
            embs.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    table = torch.cat(embs)
    row = {p: i for i, p in enumerate(unique)}
    return F.normalize(torch.stack([table[[row[p] for p in group]].mean(dim=0) for group in prompts]), dim=-1)


def _accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    return (pred == true).float().mean().item()


def _motion_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    out = {"video_motion_top1": _accuracy(pred, true)}
    for i, m in enumerate(MOTIONS):
        sel = true == i
        if sel.any():
            out[f"video_motion_{m}_acc"] = _accuracy(pred[sel], true[sel])
    for name, (m1, m2) in SWAP_PAIRS.items():
        i1, i2 = MOTIONS.index(m1), MOTIONS.index(m2)
        sel = (true == i1) | (true == i2)
        if sel.any():
            opposite = torch.where(true[sel] == i1, i2, i1)
            out[f"video_motion_swap_{name}"] = _accuracy(pred[sel], opposite)
    return out


def _zeroshot(emb: VideoEmbeddings, classifiers: dict[str, torch.Tensor]) -> dict[str, float]:
    single = emb.tracks == 1
    out: dict[str, float] = {}
    logits = {k: emb.video @ w.t() for k, w in classifiers.items()}
    recolour = emb.motion == MOTIONS.index("recolour")
    sel = single & ~recolour & (emb.colour_shape >= 0)
    if sel.any():
        out["video_zeroshot_top1"] = _accuracy(logits["colour_shape"][sel].argmax(1), emb.colour_shape[sel])
    sel = single & (emb.motion >= 0)
    if sel.any():
        out.update(_motion_metrics(logits["motion"][sel].argmax(1), emb.motion[sel]))
        out["video_axis_top1"] = _accuracy(logits["axis"][sel].argmax(1), emb.axis[sel])
    out["video_zeroshot_clips"] = float(int(single.sum()))
    return out


def video_eval(model: Any, loader: Any, tokenize: Tokenize, device: Union[str, torch.device, None] = None,
               preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, float]:
    """Video retrieval and zero-shot metrics of `model` (needs `encode_text`, and `encode_video` or
    `encode_image`) over `loader` (as `load_video_eval_set` makes it).

    Returns fractions in [0, 1]: `video_t2v_r{1,5,10}`, `video_v2t_r{1,5,10}`; with shapes-world labels
    `video_zeroshot_top1` (colour x shape, 48 classes), `video_motion_top1` (8), `video_axis_top1` (5),
    `video_motion_<m>_acc` (motions present), `video_motion_swap_{lr,ud,gs}` (see the module docstring).
    Counts (floats): `video_clips` (clips scored), `video_zeroshot_clips` (single-track clips),
    `video_skipped_clips` (bad clips the loader skipped, when it counts them)."""
    counter = getattr(getattr(loader, "dataset", None), "skipped", None)  # cumulative over passes: take the delta
    before = dict(counter) if counter is not None else {}
    emb = encode_clips(model, loader, tokenize, device, preprocess)
    out = {f"video_{k}": v for k, v in multi_positive_recall(emb.video, emb.text, same_caption(emb.captions)).items()}
    if (emb.tracks > 0).any():
        prompts = class_prompts()
        classifiers = {k: class_embeddings(model, tokenize, p, device) for k, p in prompts.items()}
        out.update(_zeroshot(emb, classifiers))
    out["video_clips"] = float(emb.video.shape[0])
    if counter is not None:
        skipped = {k: n - before.get(k, 0) for k, n in counter.items() if n > before.get(k, 0)}
        out["video_skipped_clips"] = float(sum(skipped.values()))
        if skipped:
            log.warning("video eval: skipped %s", skipped)
    return out
