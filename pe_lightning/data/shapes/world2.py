"""The shapes world, version 2 (#28): scenes where an image's global label is not every token's label.

What changes from version 1 (scenes.py, render.py, captions.py, qa.py, which stay as they were):
- 1 to 5 objects per scene (N_WEIGHTS), which may overlap: drawn in z-order (the json's `objects` list, back to
  front; `z` = that position), each keeping at least MIN_VISIBLE of its area in view. The instance mask is
  drawn with the same primitives in the same order, so it holds exactly each object's visible pixels.
- Textured fills (FILLS: solid, shaded, speckled; the hue and the colour word stay true) and textured
  backgrounds (plain, gradient, checker, clouds; always muted). The diagonal two-tone stripes of the `texture`
  style shift and the per-pixel noise of the `noise` shift stay out of training images, so both remain shifts.
- Small and large objects of a wider range (SIZES2), rendered natively at the world's size (the recipe preset
  renders at 128 px; lower-resolution phases downsample).
- Captions name only some of the objects, the more visible first, as web alt-text does, with spatial and
  occlusion relations ("in front of", "behind") and sometimes the scene's count.
- QA: counting (all shapes, per colour, per shape) and relations (left/right, above/below, in front/behind).
- A dense-probe split (`dense/{train,test}`): 3-5 objects of distinct shapes per scene, so no image-level label
  is every object token's label.
The 48-way zero-shot sets keep their meaning: one object per image, the same 6 held-out colour-shape pairs (never
in any training image or text), the same four styles, drawn at this world's sizes and on its backgrounds.
"""

from __future__ import annotations

import colorsys
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageDraw

from pe_lightning.data.shapes.captions import INVERSE, region, relation
from pe_lightning.data.shapes.render import _shade, draw_shape
from pe_lightning.data.shapes.scenes import ALL_PAIRS, BOUND, SHAPES, TRAIN_PAIRS, Obj, Scene, a

N_WEIGHTS = (0.3, 0.25, 0.2, 0.15, 0.1)  # P(1..5 objects) in training, retrieval and QA scenes
DENSE_N = (3, 4, 5)  # objects per dense-probe scene (distinct shapes)
SIZES2: dict[str, tuple[float, float]] = {"small": (0.07, 0.11), "large": (0.17, 0.23)}  # radius / side, range
MIN_VISIBLE = 0.5  # an object keeps at least this fraction of its own area in view
FILLS = ("solid", "shaded", "speckled")
FILL_P = (0.5, 0.25, 0.25)
BACKGROUNDS = ("plain", "gradient", "checker", "clouds")
NUMBERS2 = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
          "hexagon": "hexagons", "cross": "crosses"}


@dataclass
class Obj2(Obj):
    fill: str = "solid"
    visible: float = 1.0  # fraction of its own area in view (set when the scene is laid out)

    def to_json(self, oid: int) -> dict:
        return {**super().to_json(oid), "z": oid - 1, "fill": self.fill, "visible": round(self.visible, 3)}


@dataclass
class Scene2(Scene):
    occludes: tuple = ()  # (i, j): object i (in front) hides part of object j

    def to_json(self) -> dict:
        return {**super().to_json(), "world": 2, "occludes": [[int(i) + 1, int(j) + 1] for i, j in self.occludes]}


# ----------------------------------------------------------------------------------------------------------
# sampling

def _muted(rng: np.random.Generator) -> list[int]:
    h, s, v = rng.random(), rng.uniform(0.06, 0.3), rng.uniform(0.36, 0.72)
    return [int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v)]


def sample_background2(rng: np.random.Generator) -> dict:
    """Muted (low saturation, mid value) backgrounds, never confusable with a shape colour."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if kind == "plain":
        return {"kind": "plain", "colour": _muted(rng)}
    if kind == "gradient":
        return {"kind": "gradient", "from": _muted(rng), "to": _muted(rng), "angle": float(rng.uniform(0, 360))}
    if kind == "checker":
        return {"kind": "checker", "from": _muted(rng), "to": _muted(rng), "cell": float(rng.uniform(0.06, 0.16)),
                "angle": float(rng.uniform(0, 90))}
    return {"kind": "clouds", "from": _muted(rng), "to": _muted(rng), "grid": int(rng.integers(3, 7)),
            "seed": int(rng.integers(1 << 31))}


def _radius(rng: np.random.Generator, size: str, px: int) -> float:
    lo, hi = SIZES2[size]
    return float(rng.uniform(lo, hi) * px)


def _own_mask(obj: Obj, px: int) -> np.ndarray:
    m = Image.new("L", (px, px), 0)
    draw_shape(ImageDraw.Draw(m), obj, fill=1)
    return np.asarray(m, dtype=bool)


def layout(objs: list[Obj2], px: int) -> Optional[tuple[list[np.ndarray], list[tuple[int, int]]]]:
    """(each object's visible mask, occlusion pairs) in z-order, or None when some object would keep less than
    MIN_VISIBLE of its area (or fewer than 12 pixels) in view. Sets each object's `visible`."""
    own = [_own_mask(o, px) for o in objs]
    visible, occludes = [], []
    for i, m in enumerate(own):
        v = m.copy()
        for j in range(i + 1, len(own)):
            if (v & own[j]).any():
                occludes.append((j, i))
                v &= ~own[j]
        area = int(m.sum())
        if area == 0 or v.sum() < max(12, MIN_VISIBLE * area):
            return None
        objs[i].visible = float(v.sum()) / area
        visible.append(v)
    return visible, sorted(occludes)


def sample_objects2(rng: np.random.Generator, px: int, n: int, pairs: Iterable[tuple[str, str]],
                    distinct_shapes: bool = False, tries: int = 80) -> tuple[list[Obj2], list[tuple[int, int]]]:
    """n objects with distinct colour-shape pairs (and distinct shapes if asked), placed anywhere in the image
    (overlaps allowed, each at least MIN_VISIBLE in view), z-ordered back to front."""
    pairs = list(pairs)
    for attempt in range(tries):
        if distinct_shapes:
            shapes = [SHAPES[int(k)] for k in rng.choice(len(SHAPES), size=n, replace=False)]
            chosen = []
            for s in shapes:
                options = [p for p in pairs if p[1] == s]
                chosen.append(options[int(rng.integers(len(options)))])
        else:
            chosen = [pairs[int(k)] for k in rng.choice(len(pairs), size=n, replace=False)]
        crowded = attempt >= tries // 2  # after many failures: small objects only
        objs = []
        for colour, shape in chosen:
            size = "small" if crowded or rng.random() < 0.5 else "large"
            r = _radius(rng, size, px)
            b = BOUND * r
            cx, cy = rng.uniform(b + 1, px - b - 1), rng.uniform(b + 1, px - b - 1)
            angle = 0.0 if shape == "circle" else float(rng.uniform(-20, 20))
            fill = FILLS[int(rng.choice(len(FILLS), p=FILL_P))]
            objs.append(Obj2(shape=shape, colour=colour, size=size, cx=float(cx), cy=float(cy), r=r, angle=angle,
                             fill=fill))
        laid = layout(objs, px)
        if laid is not None:
            return objs, laid[1]
    raise RuntimeError(f"could not place {n} objects in {px} px after {tries} tries")  # never at px >= 32, n <= 5


def sample_scene2(rng: np.random.Generator, px: int, pairs: Iterable[tuple[str, str]] = TRAIN_PAIRS,
                  n: Optional[int] = None) -> Scene2:
    if n is None:
        n = 1 + int(rng.choice(len(N_WEIGHTS), p=N_WEIGHTS))
    objs, occ = sample_objects2(rng, px, n, pairs)
    return Scene2(size=px, objects=list(objs), background=sample_background2(rng), occludes=tuple(occ))


def dense_scene2(rng: np.random.Generator, px: int) -> Scene2:
    """A dense-probe scene: 3-5 objects of distinct shapes (any colour, held-out pairs included: no text)."""
    n = int(rng.choice(DENSE_N))
    objs, occ = sample_objects2(rng, px, n, ALL_PAIRS, distinct_shapes=True)
    return Scene2(size=px, objects=list(objs), background=sample_background2(rng), occludes=tuple(occ))


def single_scene2(rng: np.random.Generator, px: int, colour: str, shape: str, style: str = "solid") -> Scene2:
    """One given colour-shape (the zero-shot sets), solid fill: the styles are the shifts."""
    size = "small" if rng.random() < 0.5 else "large"
    r = _radius(rng, size, px)
    b = BOUND * r
    cx, cy = rng.uniform(b + 1, px - b - 1), rng.uniform(b + 1, px - b - 1)
    angle = 0.0 if shape == "circle" else float(rng.uniform(-20, 20))
    obj = Obj2(shape=shape, colour=colour, size=size, cx=float(cx), cy=float(cy), r=r, angle=angle)
    return Scene2(size=px, objects=[obj], background=sample_background2(rng), style=style)


# ----------------------------------------------------------------------------------------------------------
# rendering

def _ramp(px: int, angle_deg: float) -> np.ndarray:
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / max(px - 1, 1)
    a_ = math.radians(angle_deg)
    t = xx * math.cos(a_) + yy * math.sin(a_)
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def render_background2(bg: dict, px: int) -> np.ndarray:
    kind = bg["kind"]
    if kind == "plain":
        return np.broadcast_to(np.array(bg["colour"], np.uint8), (px, px, 3)).copy()
    a_, b_ = np.array(bg["from"], np.float32), np.array(bg["to"], np.float32)
    if kind == "gradient":
        t = _ramp(px, bg["angle"])
    elif kind == "checker":
        yy, xx = np.mgrid[0:px, 0:px].astype(np.float32)
        ang = math.radians(bg["angle"])
        u, v = xx * math.cos(ang) + yy * math.sin(ang), -xx * math.sin(ang) + yy * math.cos(ang)
        cell = max(2.0, bg["cell"] * px)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    elif kind == "clouds":
        g = np.random.Generator(np.random.PCG64(int(bg["seed"]))).random((bg["grid"], bg["grid"]))
        t = np.asarray(Image.fromarray((g * 255).astype(np.uint8), "L").resize((px, px), Image.BICUBIC),
                       np.float32) / 255.0
    else:
        raise ValueError(f"unknown background kind {kind}")
    arr = a_[None, None] * (1 - t[..., None]) + b_[None, None] * t[..., None]
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _fill_pixels(obj: Obj2, where: np.ndarray, rng: np.random.Generator, px: int) -> np.ndarray:
    """Colours of the object's pixels at `where` (bool [px, px]): [k, 3] uint8. Shading and speckle only darken
    (white and black by less / by lifting), so the colour word stays true."""
    rgb = np.array(obj.rgb, np.float32)
    k = int(where.sum())
    if obj.fill == "solid" or k == 0:
        return np.broadcast_to(rgb.astype(np.uint8), (k, 3))
    lo = 0.88 if obj.colour == "white" else 0.7
    if obj.fill == "shaded":
        f = lo + (1 - lo) * _ramp(px, float(rng.uniform(0, 360)))[where]
    else:  # speckled
        f = rng.uniform(lo, 1.0, k).astype(np.float32)
    if obj.colour == "black":  # darkening black does nothing: lift it instead, to at most a dark grey
        out = rgb[None] + (1 - f[:, None]) / (1 - 0.7) * 50.0
    else:
        out = rgb[None] * f[:, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_scene2(scene: Scene2, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """(RGB image, L mask: id i = the i-th object (z-order) on the pixels where it is visible, 0 = background)."""
    px = scene.size
    img = render_background2(scene.background, px)
    if scene.style == "noise":
        noise = rng.normal(0, 45, img.shape).round().astype(np.int16)
        img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    mask = np.zeros((px, px), np.uint8)
    outline_w = max(2, px // 32)
    for i, obj in enumerate(scene.objects, start=1):
        if scene.style == "outline":
            m = Image.new("L", (px, px), 0)
            draw_shape(ImageDraw.Draw(m), obj, outline=1, width=outline_w)
            own = np.asarray(m, dtype=bool)
            img[own] = obj.rgb
        elif scene.style == "texture":  # the style shift: version 1's diagonal two-tone stripes
            own = _own_mask(obj, px)
            yy, xx = np.mgrid[0:px, 0:px]
            stripe = ((xx + yy) // max(2, px // 21)) % 2 == 0
            img[own & stripe] = obj.rgb
            img[own & ~stripe] = _shade(obj.rgb)
        else:
            own = _own_mask(obj, px)
            img[own] = _fill_pixels(obj, own, rng, px)
        mask[own] = i
    return Image.fromarray(img, "RGB"), Image.fromarray(mask, "L")


# ----------------------------------------------------------------------------------------------------------
# captions: alt-text that names some of the objects

def _salience_order(objs: list[Obj2], rng: np.random.Generator) -> list[int]:
    """Object indices, the more visible area first (with noise), as a writer notices the prominent ones."""
    area = np.array([o.r * o.r * o.visible for o in objs], np.float64)
    keys = np.log(area) + rng.gumbel(size=len(objs)) * 0.5
    return [int(i) for i in np.argsort(-keys, kind="stable")]


def pair_relation(scene: Scene2, i: int, j: int) -> Optional[str]:
    """Where object i is relative to object j: 'in front of' / 'behind' when one hides part of the other, else
    'left of' / 'right of' / 'above' / 'below' (clear margins) or None."""
    if (i, j) in scene.occludes:
        return "in front of"
    if (j, i) in scene.occludes:
        return "behind"
    return relation(scene.objects[i], scene.objects[j], scene.size)


def caption_scene2(scene: Scene2, rng: np.random.Generator) -> str:
    objs = scene.objects
    n = len(objs)
    with_size = bool(rng.random() < 0.4)
    order = _salience_order(objs, rng)
    k = min(n, 1 + int(rng.choice(3, p=(0.55, 0.35, 0.1))))
    named = order[:k]
    d = [objs[i].describe(with_size) for i in named]
    count = NUMBERS2[n]
    if k == 1:
        options = [f"{a(d[0])}.", f"a photo of {a(d[0])}.", f"{a(d[0])} {region(objs[named[0]], scene.size)}."]
        if n > 1:
            options += [f"{a(d[0])} and other shapes.", f"{a(d[0])} among {count} shapes.",
                        f"{count} shapes, including {a(d[0])}."]
        return options[int(rng.integers(len(options)))]
    listing = ", ".join(a(x) for x in d[:-1]) + f" and {a(d[-1])}"
    options = [f"{listing}.", f"{listing} on a {scene.background['kind']} background."
               if scene.background["kind"] in ("checker", "plain") else f"{listing}."]
    if n > k:
        options += [f"{count} shapes, including {listing}.", f"{listing}, among other shapes."]
    else:
        options += [f"{count} shapes: {listing}."]
    rel = pair_relation(scene, named[0], named[1])
    if rel is not None:
        tail = f", and {a(d[2])}" if k == 3 else ""
        options += [f"{a(d[0])} {rel} {a(d[1])}{tail}."] * 3  # relations are the interesting part: weight them up
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------------------------------------
# QA: counting and relations first

def scene_qa2(scene: Scene2, rng: np.random.Generator, max_turns: int = 5) -> list[dict]:
    """Up to max_turns question-answer pairs: one counting question, one relation question where the scene has
    a pair with a clear relation, the rest drawn from attribute, existence, counting and relation questions.
    Only unambiguous questions (a named object is unique by its description); "no" answers never name a
    held-out pair."""
    objs = scene.objects
    px = scene.size
    shapes = Counter(o.shape for o in objs)
    colours = Counter(o.colour for o in objs)
    counting = [("How many shapes are there?", NUMBERS2[len(objs)])]
    for s in sorted(set(SHAPES)):
        if shapes[s] or rng.random() < 0.15:
            counting.append((f"How many {PLURAL[s]} are there?", NUMBERS2[shapes[s]]))
    for c in sorted(colours):
        counting.append((f"How many {c} shapes are there?", NUMBERS2[colours[c]]))
    relations = []
    for i, p in enumerate(objs):
        for j in range(i + 1, len(objs)):
            q = objs[j]
            rel = pair_relation(scene, i, j)
            if rel in ("in front of", "behind"):
                front = p if rel == "in front of" else q
                relations.append((f"Which is in front, the {p.describe()} or the {q.describe()}?",
                                  f"the {front.describe()}"))
                relations.append((f"Is the {p.describe()} in front of or behind the {q.describe()}?",
                                  "in front" if rel == "in front of" else "behind"))
            elif rel in ("left of", "right of"):
                relations.append((f"Is the {p.describe()} left or right of the {q.describe()}?", rel.split()[0]))
                left = p if rel == "left of" else q
                relations.append((f"Which is further left, the {p.describe()} or the {q.describe()}?",
                                  f"the {left.describe()}"))
            elif rel in ("above", "below"):
                relations.append((f"Is the {p.describe()} above or below the {q.describe()}?", rel))
                relations.append((f"Is the {q.describe()} above or below the {p.describe()}?", INVERSE[rel]))
    other = []
    for o in objs:
        if shapes[o.shape] == 1:
            other.append((f"What colour is the {o.shape}?", o.colour))
            other.append((f"Is the {o.shape} small or large?", o.size))
        if colours[o.colour] == 1:
            other.append((f"What shape is the {o.colour} object?", o.shape))
        other.append((f"Is there {a(o.describe())}?", "yes"))
    present = {(o.colour, o.shape) for o in objs}
    absent = [p for p in TRAIN_PAIRS if p not in present]
    c, s = absent[int(rng.integers(len(absent)))]
    other.append((f"Is there {a(f'{c} {s}')}?", "no"))
    picked = [counting.pop(int(rng.integers(len(counting))))]
    if relations:
        picked.append(relations.pop(int(rng.integers(len(relations)))))
    rest = counting + relations + other
    for i in rng.permutation(len(rest))[: max(0, max_turns - len(picked))]:
        picked.append(rest[int(i)])
    return [{"question": q, "answer": ans} for q, ans in picked]
