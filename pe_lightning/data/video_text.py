"""Video-text samples as video2dataset writes them: `{key}.mp4` + `.txt` (+ `.json`), decoded with PyAV.

Frame sampling (T = frames in the clip, N = `num_frames`):
- `uniform` (eval always; the train default): Meta's eval rule (apps/pe/clip_benchmark/datasets/
  video_classification_dataset.py): indices `int(i * (T - 1) / (N - 1))` for i = 0..N-1, so the first and
  the last frame are included; N = 1 takes the middle frame `T // 2`.
- `segment` (train only, our choice to offer, as ViCLIP trains): the clip is cut into N equal segments
  `[floor(i*T/N), floor((i+1)*T/N))` and one frame is drawn uniformly inside each, from a generator seeded by
  (seed, global sample index) like the augmentation, so a sample gets the same frames whichever worker, rank
  layout or resume produced it.
A clip shorter than N frames repeats frames instead of failing (uniform: the rule above simply repeats
indices; segment: every segment keeps at least one frame). Indices are always non-decreasing.

All frames of a clip get the same augmentation (one crop, one jitter, one flip), seeded by the global sample
index; a flipped clip's caption has left/right swapped. Chunks: {"video": float [n, N, 3, S, S],
"text": long [n, ctx]}. Skip reasons: `missing_video`, `bad_video` (undecodable, no video stream, no
decodable frame, empty file), plus the caption reasons of image_text.py. Whether a clip is skipped never
depends on the sampling (any clip with >= 1 decodable frame is usable), so `validate` (uniform) raises
exactly when `decode` (any mode) would.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from pe_lightning.data.image_text import decode_caption
from pe_lightning.data.shards import DataError, SkipSample
from pe_lightning.data.transforms import TrainTransform, eval_transform, sample_rng, swap_left_right

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
FRAME_SAMPLING = ("uniform", "segment")
_TAG_FRAMES = 0xF7A3  # sample_rng tag of the frame draw: independent of the augmentation's draws (tag 0)

__all__ = ["VIDEO_EXTS", "FRAME_SAMPLING", "uniform_indices", "segment_bounds", "segment_indices",
           "decode_video_frames", "check_frame_sampling", "VideoTextDecoder", "video_decoder_for"]

PickFrames = Callable[[int], list[int]]  # frames in the clip -> the indices to keep


def uniform_indices(n_frames: int, num: int) -> list[int]:
    """Meta's eval rule: `int(i * (T - 1) / (N - 1))`, i = 0..N-1 (first and last frame); N = 1 -> [T // 2].
    T < N repeats frames, e.g. T=5, N=8 -> [0, 0, 1, 1, 2, 2, 3, 4]."""
    if n_frames <= 0:
        raise ValueError("a clip needs at least one frame")
    if num <= 0:
        raise ValueError(f"num_frames must be >= 1, got {num}")
    if num == 1:
        return [n_frames // 2]
    return [int(i * (n_frames - 1) / (num - 1)) for i in range(num)]


def segment_bounds(n_frames: int, num: int) -> list[tuple[int, int]]:
    """The N equal segments [lo, hi) of a T-frame clip; each keeps at least one frame (T < N repeats)."""
    if n_frames <= 0:
        raise ValueError("a clip needs at least one frame")
    if num <= 0:
        raise ValueError(f"num_frames must be >= 1, got {num}")
    out = []
    for i in range(num):
        lo = i * n_frames // num
        hi = max(lo + 1, (i + 1) * n_frames // num)
        out.append((lo, hi))
    return out


def segment_indices(n_frames: int, num: int, rng: np.random.Generator) -> list[int]:
    """One frame drawn uniformly in each of the N equal segments (always N draws: streams stay aligned)."""
    u = rng.random(num)
    return [lo + min(hi - lo - 1, int(x * (hi - lo))) for (lo, hi), x in zip(segment_bounds(n_frames, num), u)]


def _decode_selected(container, wanted: list[int]) -> Optional[list[Image.Image]]:
    need = set(wanted)
    last = max(wanted)
    got: dict[int, Image.Image] = {}
    for i, frame in enumerate(container.decode(video=0)):
        if i in need:
            got[i] = frame.to_image()
        if i >= last:
            break
    return [got[i] for i in wanted] if len(got) == len(need) else None


def decode_video_frames(data: bytes, num_frames: int, pick: Optional[PickFrames] = None) -> list[Image.Image]:
    """mp4 (or any container PyAV reads) bytes -> `num_frames` RGB PIL frames.

    `pick(T)` gives the indices to keep (default: `uniform_indices(T, num_frames)`); it must be a pure
    function of T, as it is called again with the decodable count when the container's count is wrong."""
    import av

    pick = pick or (lambda n: uniform_indices(n, num_frames))
    with av.open(io.BytesIO(data)) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        n = c.streams.video[0].frames
        if n > 0:  # the container knows its frame count: one pass, converting only the sampled frames
            frames = _decode_selected(c, pick(n))
            if frames is not None:
                return frames
    # no or wrong frame count in the container: count the decodable frames, then sample
    with av.open(io.BytesIO(data)) as c:
        n = sum(1 for _ in c.decode(video=0))
    if n <= 0:
        raise ValueError("no decodable frames")
    with av.open(io.BytesIO(data)) as c:
        frames = _decode_selected(c, pick(n))
    if frames is None:
        raise ValueError("could not decode the sampled frames")
    return frames


def check_frame_sampling(value: str) -> str:
    if value not in FRAME_SAMPLING:
        raise DataError(f"data.frame_sampling must be one of {', '.join(FRAME_SAMPLING)}, got {value!r}: set "
                        "data.frame_sampling=uniform (Meta's eval rule) or segment (a random frame per segment)")
    return value


class VideoTextDecoder:
    """Raw sample -> [N, 3, S, S] frames + caption; chunks get tokenized.

    `train=False`: uniform frames and Meta's eval preprocessing, whatever `frame_sampling` says."""

    def __init__(self, image_size: int, num_frames: int, augment: Any,
                 tokenize: Optional[Callable[[list[str]], torch.Tensor]], seed: int, train: bool = True,
                 keep_captions: bool = False, frame_sampling: str = "uniform"):
        self.transform = TrainTransform(augment, image_size)
        self.size = int(image_size)
        self.num_frames = int(num_frames)
        if self.num_frames <= 0:
            raise DataError(f"data.num_frames must be >= 1, got {num_frames}")
        self.tokenize = tokenize
        self.seed = int(seed)
        self.train = train
        self.keep_captions = keep_captions
        self.frame_sampling = check_frame_sampling(frame_sampling)

    def picker(self, index: Optional[int]) -> PickFrames:
        """The frame rule of the sample with this global index (None: uniform, as `validate` uses)."""
        n = self.num_frames
        if not self.train or self.frame_sampling == "uniform" or index is None:
            return lambda t: uniform_indices(t, n)
        seed = self.seed
        return lambda t: segment_indices(t, n, sample_rng(seed, index, _TAG_FRAMES))

    def _frames(self, raw: dict, index: Optional[int] = None) -> list[Image.Image]:
        data = next((raw[e] for e in VIDEO_EXTS if e in raw), None)
        if data is None:
            raise SkipSample("missing_video", f"members: {sorted(k for k in raw if not k.startswith('__'))}")
        try:
            return decode_video_frames(data, self.num_frames, self.picker(index))
        except Exception as e:  # PyAV / codec errors of any kind: skip, never kill the run
            raise SkipSample("bad_video", f"{type(e).__name__}: {e}") from None

    def validate(self, raw: dict) -> None:
        decode_caption(raw)
        self._frames(raw)

    def decode(self, raw: dict, index: int) -> dict:
        caption = decode_caption(raw)
        frames = self._frames(raw, index)
        if self.train:
            p = self.transform.sample(sample_rng(self.seed, index), frames[0].width, frames[0].height)
            x = torch.stack([self.transform.apply(f, p) for f in frames])  # one crop/jitter/flip per clip
            if p.flip:
                caption = swap_left_right(caption)
        else:
            x = torch.stack([eval_transform(f, self.size) for f in frames])
        return {"video": x, "caption": caption}

    def collate(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        out: dict[str, Any] = {"video": torch.stack([s["video"] for s in samples])}
        if self.tokenize is not None:
            out["text"] = torch.as_tensor(self.tokenize(captions), dtype=torch.long)
        if self.keep_captions or self.tokenize is None:
            out["caption"] = captions
        return out


def video_decoder_for(cfg: Any, tokenize: Optional[Callable[[list[str]], torch.Tensor]], seed: int,
                      train: bool = True, keep_captions: bool = False) -> VideoTextDecoder:
    """The decoder a `data:` section (DataConfig) asks for: image_size, num_frames, augment, frame_sampling."""
    return VideoTextDecoder(cfg.image_size, cfg.num_frames, cfg.augment, tokenize, seed, train=train,
                            keep_captions=keep_captions,
                            frame_sampling=getattr(cfg, "frame_sampling", "uniform"))
