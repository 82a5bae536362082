"""Meta's eval preprocessing and PE's training augmentations (PE_REFERENCE.md s.3 and s.6).

Eval (`eval_transform`): squash-resize to S x S, bilinear (PIL's, i.e. what torchvision's `Resize` does on a
PIL image), to [0, 1], then normalise with mean = std = 0.5, giving values in [-1, 1].

Train (`TrainTransform`): random resized crop (scale / ratio from `AugmentConfig`), brightness and saturation
jitter, horizontal flip; each can be switched off by its config key (`enabled: false` -> eval preprocessing).
All randomness comes from the generator passed in, which the pipelines seed from (seed, global sample
index) with `sample_rng`: a sample gets the same augmentation whichever worker, rank layout or resume
produced it. A flipped sample's text is made truthful again by `swap_left_right`.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
# grayscale weights of torchvision's rgb_to_grayscale (ITU-R 601-2 luma), used by the saturation jitter
_LUMA = (0.2989, 0.587, 0.114)

__all__ = [
    "MEAN",
    "STD",
    "derive_seed",
    "sample_rng",
    "to_tensor",
    "normalize",
    "eval_transform",
    "AugParams",
    "TrainTransform",
    "swap_left_right",
]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across processes, platforms and Python versions)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(struct.pack("<q", int(p) & 0x7FFF_FFFF_FFFF_FFFF))
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_rng(seed: int, index: int, tag: int = 0) -> np.random.Generator:
    """The generator for one sample's augmentation: a pure function of (seed, global sample index)."""
    return np.random.Generator(np.random.PCG64(derive_seed(seed, 0x5A17, tag, index)))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> mean = std = 0.5 normalisation (in place where possible). Works on [..., 3, H, W]."""
    return x.sub_(0.5).div_(0.5)


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """Meta's preprocessing: squash-resize to size x size (bilinear), mean = std = 0.5. -> float [3, S, S]."""
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return normalize(to_tensor(img))


@dataclass
class AugParams:
    """One sample's drawn augmentation: crop box in source pixels, jitter factors, flip."""

    box: tuple[float, float, float, float]  # left, top, right, bottom
    brightness: float = 1.0
    saturation: float = 1.0
    flip: bool = False


class TrainTransform:
    """PE's training augmentation for one output size. `cfg` is an AugmentConfig (or anything with its keys)."""

    def __init__(self, cfg: Any, size: int):
        self.size = int(size)
        self.enabled = bool(getattr(cfg, "enabled", True))
        self.scale = (float(cfg.crop_scale_min), float(cfg.crop_scale_max))
        self.ratio = (float(cfg.crop_ratio_min), float(cfg.crop_ratio_max))
        self.brightness = float(cfg.brightness)
        self.saturation = float(cfg.saturation)
        self.hflip = float(cfg.hflip)
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"augment: need 0 < crop_scale_min <= crop_scale_max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"augment: need 0 < crop_ratio_min <= crop_ratio_max, got {self.ratio}")
        if not (0 <= self.hflip <= 1) or self.brightness < 0 or self.saturation < 0:
            raise ValueError("augment: hflip must be in [0, 1] and brightness / saturation >= 0")

    def sample(self, rng: np.random.Generator, width: int, height: int) -> AugParams:
        """Draw the parameters (always the same number of draws, so streams stay aligned)."""
        if not self.enabled:
            return AugParams(box=(0.0, 0.0, float(width), float(height)))
        box = self._crop_box(rng, width, height)
        b = float(rng.uniform(1 - self.brightness, 1 + self.brightness))
        s = float(rng.uniform(1 - self.saturation, 1 + self.saturation))
        flip = bool(rng.random() < self.hflip)
        return AugParams(box=box, brightness=max(b, 0.0), saturation=max(s, 0.0), flip=flip)

    def _crop_box(self, rng: np.random.Generator, width: int, height: int) -> tuple[float, float, float, float]:
        # torchvision RandomResizedCrop.get_params, with our generator and a fixed number of draws per try
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        draws = rng.random((10, 4))
        for u in draws:
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            ar = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
            w = int(round(math.sqrt(target * ar)))
            h = int(round(math.sqrt(target / ar)))
            if 0 < w <= width and 0 < h <= height:
                top = int(u[2] * (height - h + 1))
                left = int(u[3] * (width - w + 1))
                return (float(left), float(top), float(left + w), float(top + h))
        # fallback: central crop at the nearest allowed ratio
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return (float(left), float(top), float(left + w), float(top + h))

    def apply(self, img: Image.Image, p: AugParams) -> torch.Tensor:
        """Crop + resize (bilinear, antialiased like PIL/torchvision), jitter, flip, normalise -> [3, S, S]."""
        img = img.convert("RGB")
        if p.box == (0.0, 0.0, float(img.width), float(img.height)) and img.size == (self.size, self.size):
            out = img
        else:
            out = img.resize((self.size, self.size), Image.BILINEAR, box=p.box)
        x = to_tensor(out)
        x = self.jitter(x, p)
        if p.flip:
            x = x.flip(-1)
        return normalize(x)

    @staticmethod
    def jitter(x: torch.Tensor, p: AugParams) -> torch.Tensor:
        """Brightness then saturation on [..., 3, H, W] in [0, 1] (torchvision's definitions)."""
        if p.brightness != 1.0:
            x = (x * p.brightness).clamp_(0, 1)
        if p.saturation != 1.0:
            gray = (_LUMA[0] * x[..., 0:1, :, :] + _LUMA[1] * x[..., 1:2, :, :] + _LUMA[2] * x[..., 2:3, :, :])
            x = (gray + p.saturation * (x - gray)).clamp_(0, 1)
        return x

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator]) -> tuple[torch.Tensor, bool]:
        """(tensor, flipped). `rng=None` -> eval preprocessing."""
        if rng is None:
            return eval_transform(img, self.size), False
        p = self.sample(rng, img.width, img.height)
        return self.apply(img, p), p.flip


_LR = re.compile(r"\b(left|right)(most|ward|wards)?\b", re.IGNORECASE)


def resize_to(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Batched images [..., 3, H, W] to resolution x resolution on their device (bilinear, antialiased).
    Progressive resolution and the eval callbacks resize here, so the data stream never restarts for it."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    out = torch.nn.functional.interpolate(flat, size=(resolution, resolution), mode="bilinear",
                                          align_corners=False, antialias=True)
    return out.reshape(*lead, *out.shape[-3:])


def swap_left_right(text: str) -> str:
    """Swap 'left' <-> 'right' (also -most / -ward(s)), keeping capitalisation: the truthful-flip rule."""

    def sub(m: re.Match) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")

    return _LR.sub(sub, text)
