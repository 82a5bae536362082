"""The shapes world's vocabulary and scene sampling.

6 shapes x 8 colours = 48 colour-shape classes, 2 sizes. Six colour-shape pairs are held out: they never
appear in any training image, caption, video or QA pair, only in the zero-shot sets (so zero-shot accuracy
on them measures compositional generalisation). Shapes never overlap, so masks are exact and spatial
relations ("left of") are unambiguous.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 35),
    "green": (40, 165, 65),
    "blue": (35, 85, 225),
    "purple": (145, 55, 195),
    "white": (245, 245, 245),
    "black": (18, 18, 18),
}
SIZES: dict[str, float] = {"small": 0.12, "large": 0.21}  # radius as a fraction of the image side
BOUND = 1.12  # every shape lies within BOUND * r of its centre
SIZE_JITTER = 0.08

# fixed held-out pairs: each colour and each shape at most once
HELDOUT: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("orange", "hexagon"),
    ("yellow", "cross"),
    ("green", "triangle"),
    ("blue", "circle"),
    ("purple", "square"),
)
CLASSES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # 48, colour-major
TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a {c}.",
    "a drawing of a {c}.",
    "a picture of a {c}.",
    "a {c} shape.",
    "an image of a {c}.",
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT)


def a(words: str) -> str:
    """'a red circle' / 'an orange circle'."""
    return ("an " if words[:1].lower() in "aeiou" else "a ") + words


def class_index(colour: str, shape: str) -> int:
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def heldout_classes() -> list[str]:
    return [f"{c} {s}" for c, s in HELDOUT]


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    cx: float  # centre, pixels
    cy: float
    r: float  # radius, pixels
    angle: float = 0.0  # degrees

    @property
    def label(self) -> int:
        return class_index(self.colour, self.shape)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    def describe(self, with_size: bool = False) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"

    def to_json(self, oid: int) -> dict:
        b = BOUND * self.r
        return {"id": oid, "shape": self.shape, "colour": self.colour, "size": self.size, "label": self.label,
                "rgb": list(self.rgb), "cx": round(self.cx, 3), "cy": round(self.cy, 3), "r": round(self.r, 3),
                "angle": round(self.angle, 3),
                "bbox": [round(self.cx - b, 2), round(self.cy - b, 2), round(self.cx + b, 2), round(self.cy + b, 2)]}


@dataclass
class Scene:
    size: int
    objects: list[Obj]
    background: dict = field(default_factory=dict)
    style: str = "solid"  # solid | outline | texture | noise

    def to_json(self) -> dict:
        return {"size": self.size, "style": self.style, "background": self.background,
                "objects": [o.to_json(i + 1) for i, o in enumerate(self.objects)]}


def sample_background(rng: np.random.Generator) -> dict:
    """Muted (low saturation, mid value) plain or gradient background: never confusable with a shape colour."""

    def muted() -> list[int]:
        h, s, v = rng.random(), rng.uniform(0.06, 0.3), rng.uniform(0.36, 0.72)
        return [int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v)]

    if rng.random() < 0.5:
        return {"kind": "plain", "colour": muted()}
    return {"kind": "gradient", "from": muted(), "to": muted(), "angle": float(rng.uniform(0, 360))}


def _radius(rng: np.random.Generator, size_name: str, px: int) -> float:
    return SIZES[size_name] * px * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))


def place(rng: np.random.Generator, px: int, radii: list[float],
          tries: int = 60) -> Optional[list[tuple[float, float]]]:
    """Non-overlapping centres (with a 2-pixel gap) inside the image, or None."""
    centres: list[tuple[float, float]] = []
    for r in radii:
        b = BOUND * r
        for _ in range(tries):
            cx, cy = rng.uniform(b + 1, px - b - 1), rng.uniform(b + 1, px - b - 1)
            if all(math.hypot(cx - x, cy - y) >= b + BOUND * rr + 2 for (x, y), rr in zip(centres, radii)):
                centres.append((cx, cy))
                break
        else:
            return None
    return centres


def sample_objects(rng: np.random.Generator, px: int, n: int, pairs: Iterable[tuple[str, str]],
                   sizes: Optional[list[str]] = None) -> list[Obj]:
    """n objects with distinct colour-shape pairs drawn from `pairs`, placed without overlap."""
    pairs = list(pairs)
    while True:
        idx = rng.choice(len(pairs), size=n, replace=False)
        size_names = sizes or [str(rng.choice(list(SIZES))) for _ in range(n)]
        radii = [_radius(rng, s, px) for s in size_names]
        centres = place(rng, px, radii)
        if centres is None:  # too crowded: retry with small shapes
            size_names = ["small"] * n
            radii = [_radius(rng, s, px) for s in size_names]
            centres = place(rng, px, radii)
        if centres is not None:
            break
    objs = []
    for k, (i, s, r, (cx, cy)) in enumerate(zip(idx, size_names, radii, centres)):
        colour, shape = pairs[int(i)]
        angle = 0.0 if shape == "circle" else float(rng.uniform(-15, 15))
        objs.append(Obj(shape=shape, colour=colour, size=s, cx=float(cx), cy=float(cy), r=float(r), angle=angle))
    return objs


def sample_scene(rng: np.random.Generator, px: int, pairs: Iterable[tuple[str, str]] = TRAIN_PAIRS,
                 n: Optional[int] = None, style: str = "solid") -> Scene:
    """A training-style scene: 1 shape (70%), 2 (20%) or 3 (10%) shapes on a muted background.

    Mostly single objects, as in object-centric web data: in a contrastive batch, a scene's colours, count
    and sizes already tell most multi-object captions apart, so shape words get their training signal
    mostly from single-object scenes (with half of them single, shape stayed near chance in 10 minutes)."""
    if n is None:
        n = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
    return Scene(size=px, objects=sample_objects(rng, px, n, pairs), background=sample_background(rng), style=style)


def single_scene(rng: np.random.Generator, px: int, colour: str, shape: str, style: str = "solid") -> Scene:
    """One given colour-shape on a background (zero-shot sets)."""
    size = str(rng.choice(list(SIZES)))
    r = _radius(rng, size, px)
    b = BOUND * r
    cx, cy = rng.uniform(b + 1, px - b - 1), rng.uniform(b + 1, px - b - 1)
    angle = 0.0 if shape == "circle" else float(rng.uniform(-15, 15))
    obj = Obj(shape=shape, colour=colour, size=size, cx=float(cx), cy=float(cy), r=float(r), angle=angle)
    return Scene(size=px, objects=[obj], background=sample_background(rng), style=style)
