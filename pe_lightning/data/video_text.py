"""Video-text samples as video2dataset writes them: `{key}.mp4` + `.txt` (+ `.json`), decoded with PyAV.

`num_frames` frames are sampled uniformly over the clip (frame i of T is the one at the centre of the i-th
of T equal time slices); a clip shorter than T frames repeats frames instead of failing. All frames of a
clip get the same augmentation (one crop, one jitter, one flip), seeded by the global sample index; a
flipped clip's caption has left/right swapped. Chunks: {"video": float [n, T, 3, S, S], "text": long [n, ctx]}.
Skip reasons: `missing_video`, `bad_video`, plus the caption reasons of image_text.py.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Optional

import torch
from PIL import Image

from pe_lightning.data.image_text import decode_caption
from pe_lightning.data.shards import SkipSample
from pe_lightning.data.transforms import TrainTransform, eval_transform, sample_rng, swap_left_right

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")

__all__ = ["VIDEO_EXTS", "uniform_indices", "decode_video_frames", "VideoTextDecoder"]


def uniform_indices(n_frames: int, num: int) -> list[int]:
    """`num` frame indices spread uniformly over `n_frames` (repeating when n_frames < num)."""
    if n_frames <= 0:
        raise ValueError("a clip needs at least one frame")
    return [min(n_frames - 1, int((i + 0.5) * n_frames / num)) for i in range(num)]


def _decode_selected(container, wanted: list[int]) -> Optional[list[Image.Image]]:
    need = set(wanted)
    got: dict[int, Image.Image] = {}
    for i, frame in enumerate(container.decode(video=0)):
        if i in need:
            got[i] = frame.to_image()
        if i >= wanted[-1]:
            break
    return [got[i] for i in wanted] if len(got) == len(need) else None


def decode_video_frames(data: bytes, num_frames: int) -> list[Image.Image]:
    """mp4 (or any container PyAV reads) bytes -> `num_frames` RGB PIL frames, uniformly sampled."""
    import av

    with av.open(io.BytesIO(data)) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        n = c.streams.video[0].frames
        if n > 0:  # the container knows its frame count: one pass, converting only the sampled frames
            frames = _decode_selected(c, uniform_indices(n, num_frames))
            if frames is not None:
                return frames
    # no or wrong frame count in the container: count the decodable frames, then sample
    with av.open(io.BytesIO(data)) as c:
        n = sum(1 for _ in c.decode(video=0))
    if n <= 0:
        raise ValueError("no decodable frames")
    with av.open(io.BytesIO(data)) as c:
        frames = _decode_selected(c, uniform_indices(n, num_frames))
    if frames is None:
        raise ValueError("could not decode the sampled frames")
    return frames


class VideoTextDecoder:
    """Raw sample -> [T, 3, S, S] frames + caption; chunks get tokenized."""

    def __init__(self, image_size: int, num_frames: int, augment: Any,
                 tokenize: Optional[Callable[[list[str]], torch.Tensor]], seed: int, train: bool = True,
                 keep_captions: bool = False):
        self.transform = TrainTransform(augment, image_size)
        self.size = int(image_size)
        self.num_frames = int(num_frames)
        self.tokenize = tokenize
        self.seed = int(seed)
        self.train = train
        self.keep_captions = keep_captions

    def _frames(self, raw: dict) -> list[Image.Image]:
        data = next((raw[e] for e in VIDEO_EXTS if e in raw), None)
        if data is None:
            raise SkipSample("missing_video", f"members: {sorted(k for k in raw if not k.startswith('__'))}")
        try:
            return decode_video_frames(data, self.num_frames)
        except Exception as e:  # PyAV / codec errors of any kind: skip, never kill the run
            raise SkipSample("bad_video", f"{type(e).__name__}: {e}") from None

    def validate(self, raw: dict) -> None:
        decode_caption(raw)
        self._frames(raw)

    def decode(self, raw: dict, index: int) -> dict:
        caption = decode_caption(raw)
        frames = self._frames(raw)
        if self.train:
            p = self.transform.sample(sample_rng(self.seed, index), frames[0].width, frames[0].height)
            x = torch.stack([self.transform.apply(f, p) for f in frames])
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
