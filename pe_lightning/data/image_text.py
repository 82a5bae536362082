"""Image-text samples as img2dataset / DataComp write them: `{key}.jpg|png|webp` + `.txt` (+ `.json`).

`ImageTextDecoder` turns a raw tar sample into {"image": float [3, S, S], "caption": str} (train
augmentation seeded by the global sample index, or Meta's eval preprocessing) and a list of them into a
chunk {"image": [n, 3, S, S], "text": long [n, ctx]} with the `tokenize` callable. Skip reasons:
`missing_image`, `bad_image` (undecodable), `missing_caption`, `empty_caption` (blank or undecodable text).
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Callable, Optional

import torch
from PIL import Image

from pe_lightning.data.shards import SkipSample
from pe_lightning.data.transforms import TrainTransform, sample_rng, swap_left_right

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "text", "caption")

__all__ = ["IMAGE_EXTS", "ImageTextDecoder", "decode_image", "decode_caption"]


def decode_image(raw: dict, exts: tuple[str, ...] = IMAGE_EXTS, draft: Optional[int] = None) -> Image.Image:
    """First image member among `exts` -> RGB PIL image (fully loaded). Raises SkipSample.

    `draft`: let JPEG decoding downscale by 1/2..1/8 while both sides stay >= draft pixels (much faster
    for large web images; used for training, where the crop is resized anyway)."""
    data = next((raw[e] for e in exts if e in raw), None)
    if data is None:
        raise SkipSample("missing_image", f"members: {sorted(k for k in raw if not k.startswith('__'))}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning etc.
            img = Image.open(io.BytesIO(data))
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
            img = img.convert("RGB")
    except Exception as e:  # any decoder failure is a bad sample, never a dead run
        raise SkipSample("bad_image", f"{type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise SkipSample("bad_image", f"size {img.size}")
    return img


def decode_caption(raw: dict, exts: tuple[str, ...] = TEXT_EXTS) -> str:
    data = next((raw[e] for e in exts if e in raw), None)
    if data is None:
        raise SkipSample("missing_caption")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SkipSample("empty_caption", f"not utf-8: {e}") from None
    if not text:
        raise SkipSample("empty_caption")
    return text


class ImageTextDecoder:
    """Raw sample -> augmented image + caption (flips make the caption truthful); chunks get tokenized."""

    def __init__(self, image_size: int, augment: Any, tokenize: Optional[Callable[[list[str]], torch.Tensor]],
                 seed: int, train: bool = True, keep_captions: bool = False):
        self.transform = TrainTransform(augment, image_size)
        self.tokenize = tokenize
        self.seed = int(seed)
        self.train = train
        self.keep_captions = keep_captions

    @property
    def draft(self) -> Optional[int]:
        # training crops cover >= ~0.6 of a side: 2 x the output size keeps them at full resolution
        return 2 * self.transform.size if self.train and self.transform.enabled else None

    def validate(self, raw: dict) -> None:
        decode_caption(raw)
        decode_image(raw, draft=self.draft)

    def decode(self, raw: dict, index: int) -> dict:
        caption = decode_caption(raw)
        img = decode_image(raw, draft=self.draft)
        rng = sample_rng(self.seed, index) if self.train else None
        x, flipped = self.transform(img, rng)
        if flipped:
            caption = swap_left_right(caption)
        return {"image": x, "caption": caption}

    def collate(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        out: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}
        if self.tokenize is not None:
            out["text"] = torch.as_tensor(self.tokenize(captions), dtype=torch.long)
        if self.keep_captions or self.tokenize is None:
            out["caption"] = captions
        return out
