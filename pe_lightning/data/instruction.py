"""Instruction data: image + `.json` holding a list of {"question", "answer"} turns.

The json may also be an object with the list under "turns", "qa" or "conversations". Chunks are
{"image": float [n, 3, S, S], "turns": list (per sample) of lists of {"question", "answer"}}: the language
stage tokenizes with its LM's tokenizer. A flipped image gets left/right swapped in questions *and*
answers ("Is the circle left or right of the square?" / "left" stays true). Skip reasons: those of
image_text.py plus `bad_turns` (missing, unparsable or empty turn list).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from pe_lightning.data.image_text import decode_image
from pe_lightning.data.shards import SkipSample
from pe_lightning.data.transforms import TrainTransform, sample_rng, swap_left_right

__all__ = ["InstructionDecoder", "decode_turns"]


def decode_turns(raw: dict, ext: str = "json") -> list[dict]:
    data = raw.get(ext)
    if data is None:
        raise SkipSample("bad_turns", f"no .{ext} member")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SkipSample("bad_turns", f"unparsable json: {e}") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("turns", "qa", "conversations") if k in obj), None)
    if not isinstance(obj, list) or not obj:
        raise SkipSample("bad_turns", "expected a non-empty list of {question, answer}")
    turns = []
    for t in obj:
        if not isinstance(t, dict):
            raise SkipSample("bad_turns", f"turn is not an object: {t!r}")
        q, a = t.get("question"), t.get("answer")
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            raise SkipSample("bad_turns", f"turn without question/answer text: {t!r}")
        turns.append({"question": q.strip(), "answer": a.strip()})
    return turns


class InstructionDecoder:
    def __init__(self, image_size: int, augment: Any, seed: int, train: bool = True):
        self.transform = TrainTransform(augment, image_size)
        self.seed = int(seed)
        self.train = train

    @property
    def draft(self):
        return 2 * self.transform.size if self.train and self.transform.enabled else None

    def validate(self, raw: dict) -> None:
        decode_turns(raw)
        decode_image(raw, draft=self.draft)

    def decode(self, raw: dict, index: int) -> dict:
        turns = decode_turns(raw)
        img = decode_image(raw, draft=self.draft)
        x, flipped = self.transform(img, sample_rng(self.seed, index) if self.train else None)
        if flipped:
            turns = [{"question": swap_left_right(t["question"]), "answer": swap_left_right(t["answer"])}
                     for t in turns]
        return {"image": x, "turns": turns}

    def collate(self, samples: list[dict]) -> dict:
        return {"image": torch.stack([s["image"] for s in samples]), "turns": [s["turns"] for s in samples]}
