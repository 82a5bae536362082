"""Question-answer pairs about a scene (colour, shape, count, position, existence), for the language stage.

Only unambiguous questions are asked (a colour question names a shape that occurs once, ...), and "is
there a ...?" questions with a "no" answer never name a held-out pair, so held-out pairs stay out of all
training text.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from pe_lightning.data.shapes.captions import NUMBERS, relation
from pe_lightning.data.shapes.scenes import TRAIN_PAIRS, Scene, a


def scene_qa(scene: Scene, rng: np.random.Generator, max_turns: int = 5) -> list[dict]:
    objs = scene.objects
    px = scene.size
    shapes = Counter(o.shape for o in objs)
    colours = Counter(o.colour for o in objs)
    cands: list[tuple[str, str]] = [("How many shapes are there?", NUMBERS[len(objs)])]
    for o in objs:
        if shapes[o.shape] == 1:
            cands.append((f"What colour is the {o.shape}?", o.colour))
            cands.append((f"Is the {o.shape} small or large?", o.size))
        if colours[o.colour] == 1:
            cands.append((f"What shape is the {o.colour} object?", o.shape))
        cands.append((f"Is there {a(o.describe())}?", "yes"))
        if len(objs) == 1:
            if abs(o.cx - px / 2) > 0.12 * px:
                cands.append((f"Is the {o.describe()} on the left or on the right?",
                              "left" if o.cx < px / 2 else "right"))
            if abs(o.cy - px / 2) > 0.12 * px:
                cands.append((f"Is the {o.describe()} at the top or at the bottom?",
                              "top" if o.cy < px / 2 else "bottom"))
    present = {(o.colour, o.shape) for o in objs}
    absent = [p for p in TRAIN_PAIRS if p not in present]
    c, s = absent[int(rng.integers(len(absent)))]
    cands.append((f"Is there {a(f'{c} {s}')}?", "no"))
    for i, p in enumerate(objs):
        for q in objs[i + 1:]:
            rel = relation(p, q, px)
            if rel in ("left of", "right of"):
                cands.append((f"Is the {p.describe()} left or right of the {q.describe()}?", rel.split()[0]))
                left = p if rel == "left of" else q
                cands.append((f"Which is further left, the {p.describe()} or the {q.describe()}?",
                              f"the {left.describe()}"))
            elif rel in ("above", "below"):
                cands.append((f"Is the {p.describe()} above or below the {q.describe()}?", rel))
    pick = rng.permutation(len(cands))[:max_turns]
    return [{"question": cands[int(i)][0], "answer": cands[int(i)][1]} for i in pick]
