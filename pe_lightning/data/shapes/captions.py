"""Compositional captions: attributes (size, colour, shape), counts, positions and spatial relations.

Every caption is true of its image; relations come from the shapes' centres with a clear margin, and every
left/right word is a real spatial claim, so a horizontally flipped image gets a true caption by swapping
left <-> right (transforms.swap_left_right).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from pe_lightning.data.shapes.scenes import Obj, Scene, a

NUMBERS = {1: "one", 2: "two", 3: "three"}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def relation(a: Obj, b: Obj, px: int, margin: float = 0.08) -> Optional[str]:
    """Where a is relative to b: 'left of' / 'right of' / 'above' / 'below', or None if unclear."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    m = margin * px
    if abs(dx) >= abs(dy) and abs(dx) > m:
        return "left of" if dx < 0 else "right of"
    if abs(dy) > m:
        return "above" if dy < 0 else "below"
    return None


def region(o: Obj, px: int) -> str:
    """'at the top left', 'on the right', 'in the centre', ..."""
    col = "left" if o.cx < px / 3 else "right" if o.cx > 2 * px / 3 else ""
    row = "top" if o.cy < px / 3 else "bottom" if o.cy > 2 * px / 3 else ""
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the centre"


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    objs = list(scene.objects)
    px = scene.size
    with_size = bool(rng.random() < 0.5)
    order = [objs[int(i)] for i in rng.permutation(len(objs))]
    d = [o.describe(with_size) for o in order]
    n = len(objs)
    if n == 1:
        t = int(rng.integers(6))
        return [f"{a(d[0])}.", f"a photo of {a(d[0])}.", f"{a(d[0])} {region(order[0], px)}.", f"there is {a(d[0])}.",
                f"one {d[0]}.", f"a single {d[0]} on a plain background." if scene.background.get("kind") == "plain"
                else f"a single {d[0]}."][t]
    if n == 2:
        rel = relation(order[0], order[1], px)
        options = [f"{a(d[0])} and {a(d[1])}.", f"two shapes: {a(d[0])} and {a(d[1])}."]
        if rel is not None:
            options += [f"{a(d[0])} {rel} {a(d[1])}."] * 3  # relations are the interesting part: weight them up
        return options[int(rng.integers(len(options)))]
    # three
    listing = f"{a(d[0])}, {a(d[1])} and {a(d[2])}"
    options = [f"{listing}.", f"three shapes: {listing}."]
    rel = relation(order[0], order[1], px)
    if rel is not None:
        options += [f"{a(d[0])} {rel} {a(d[1])}, and {a(d[2])}."] * 2
    xs = sorted(order, key=lambda o: o.cx)
    if all(b.cx - a.cx > 0.08 * px for a, b in zip(xs, xs[1:])):
        dd = [o.describe(with_size) for o in xs]
        options.append(f"from left to right: {a(dd[0])}, {a(dd[1])} and {a(dd[2])}.")
    return options[int(rng.integers(len(options)))]
