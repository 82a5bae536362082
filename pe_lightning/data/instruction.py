"""Instruction data: an image + a `.json` of question/answer turns.

Accepted `.json` layouts (all become a list of {"question", "answer"} turns):
- our own: a list of {"question", "answer"}, or an object with that list under "turns", "qa" or
  "conversations" (the shapes world writes this, in `<root>/instruct/` and, held out, `<root>/instruct_test/`);
- LLaVA conversations: {"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
  "value": "..."}, ...]}, the bare message list, or a list of such records (their turns are concatenated).
  `from` may be human/user or gpt/assistant/model (system messages are ignored), and OpenAI-style
  {"role", "content"} messages work the same way. The `<image>` marker is removed (the language stage puts
  the image at the start of the first turn itself). Each user message is paired with the assistant message
  that follows it; a trailing unanswered question is dropped (it has no target).

`load_instruction_set(path)` reads a held-out split (e.g. `<root>/instruct_test/`) once, in order, with the
eval preprocessing, for the VQA evaluation (eval/vqa.py).

Chunks are {"image": float [n, 3, S, S], "turns": list (per sample) of lists of {question, answer}}; with
an `encoder` (the language stage's `models.llm.TurnEncoder`) each sample is also tokenized in the workers and
chunks carry its collated "input_ids", "labels", "attention_mask", "image_positions", "num_turns".

A flipped image gets left/right swapped in questions *and* answers ("Is the circle left or right of the
square?" / "left" stays true). With an encoder, the skip decision and the number of turns kept are those of
the unflipped text (so `validate` agrees with `decode`); when the swapped text would keep fewer turns, that
sample is simply not flipped. Skip reasons: those of image_text.py, `bad_turns` (missing, unparsable, empty
or unpaired turns) and the encoder's `too_long`.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch.utils.data import DataLoader

from pe_lightning.data.image_text import decode_image
from pe_lightning.data.shards import SkipSample
from pe_lightning.data.transforms import (TrainTransform, derive_seed, eval_transform, sample_rng,
                                          swap_left_right)

__all__ = ["InstructionDecoder", "TurnEncoderLike", "decode_turns", "conversation_to_turns",
           "load_instruction_set", "select_turns"]

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant", "model")
_IMAGE_TAG = re.compile(r"\s*<image>\s*")


class TurnEncoderLike(Protocol):
    """Tokenizes one sample's turns (may raise SkipSample) and pads a chunk of them."""

    def encode(self, turns: list[dict]) -> dict: ...

    def collate(self, samples: list[dict]) -> dict: ...


def _message(m: Any) -> Optional[tuple[str, str]]:
    """(role, text) of a LLaVA ({from, value}) or OpenAI ({role, content}) message, else None."""
    if not isinstance(m, dict):
        return None
    for role_key, text_key in (("from", "value"), ("role", "content")):
        if role_key in m and text_key in m:
            return str(m[role_key]).strip().lower(), m[text_key]
    return None


def conversation_to_turns(messages: list) -> list[dict]:
    """LLaVA / OpenAI-style messages -> [{question, answer}]; raises SkipSample("bad_turns")."""
    turns: list[dict] = []
    question: Optional[str] = None
    for m in messages:
        role, text = _message(m) or (None, None)
        if role is None or not isinstance(text, str):
            raise SkipSample("bad_turns", f"message without from/value text: {m!r}")
        text = _IMAGE_TAG.sub(" ", text).strip()
        if role in _USER_ROLES:
            if question is not None:
                raise SkipSample("bad_turns", "two user messages in a row")
            question = text
        elif role in _ASSISTANT_ROLES:
            if question is None:
                raise SkipSample("bad_turns", "an assistant message without a question before it")
            if not question or not text:
                raise SkipSample("bad_turns", "empty question or answer")
            turns.append({"question": question, "answer": text})
            question = None
        elif role != "system":
            raise SkipSample("bad_turns", f"unknown message role {role!r}")
    if not turns:
        raise SkipSample("bad_turns", "no answered question in the conversation")
    return turns


def _is_conversation(obj: Any) -> bool:
    return isinstance(obj, list) and bool(obj) and _message(obj[0]) is not None


def decode_turns(raw: dict, ext: str = "json") -> list[dict]:
    data = raw.get(ext)
    if data is None:
        raise SkipSample("bad_turns", f"no .{ext} member")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SkipSample("bad_turns", f"unparsable json: {e}") from None
    if isinstance(obj, list) and obj and all(isinstance(r, dict) and "conversations" in r for r in obj):
        return [t for r in obj for t in decode_turns({ext: json.dumps(r)}, ext)]  # a list of LLaVA records
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("turns", "qa", "conversations") if k in obj), None)
    if _is_conversation(obj):
        return conversation_to_turns(obj)
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


def _swap_turns(turns: list[dict]) -> list[dict]:
    return [{"question": swap_left_right(t["question"]), "answer": swap_left_right(t["answer"])} for t in turns]


_TAG_TURNS = 0x7A2

def select_turns(turns: list[dict], n: int, seed: int, key: str) -> list[dict]:
    """`n` of the turns (0 = all), drawn without replacement by a pure function of (seed, the sample's key),
    kept in their order. The same sample gets the same draw in `validate` and `decode` (flip-independent)."""
    if n <= 0 or len(turns) <= n:
        return turns
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(derive_seed(int(seed), _TAG_TURNS, zlib.crc32(key.encode()))))
    keep = sorted(int(i) for i in rng.choice(len(turns), size=n, replace=False))
    return [turns[i] for i in keep]


class InstructionDecoder:
    """`turns_per_sample` (0 = all): train only that many of a sample's turns (drawn per sample, see
    `select_turns`). With 1 every answer is predicted from the image and its own question alone, as the
    single-turn VQA evaluation asks it: a conversation whose questions name what later answers say ("Is there
    a purple hexagon?" ... "What colour is the hexagon?") otherwise teaches the LM to copy from the text."""

    def __init__(self, image_size: int, augment: Any, seed: int, train: bool = True,
                 encoder: Optional[TurnEncoderLike] = None, turns_per_sample: int = 0):
        self.transform = TrainTransform(augment, image_size)
        self.seed = int(seed)
        self.train = train
        self.encoder = encoder
        self.turns_per_sample = int(turns_per_sample)

    def _turns(self, raw: dict) -> list[dict]:
        turns = decode_turns(raw)
        key = f"{raw.get('__url__', '')}/{raw.get('__key__', '')}"
        return select_turns(turns, self.turns_per_sample, self.seed, key)

    @property
    def draft(self):
        return 2 * self.transform.size if self.train and self.transform.enabled else None

    def validate(self, raw: dict) -> None:
        turns = self._turns(raw)
        if self.encoder is not None:
            self.encoder.encode(turns)
        decode_image(raw, draft=self.draft)

    def decode(self, raw: dict, index: int) -> dict:
        turns = self._turns(raw)
        encoded = self.encoder.encode(turns) if self.encoder is not None else None
        img = decode_image(raw, draft=self.draft)
        x, flipped = self.transform(img, sample_rng(self.seed, index) if self.train else None)
        if flipped:
            swapped = _swap_turns(turns)
            if self.encoder is None:
                turns = swapped
            else:
                try:
                    swapped_encoded = self.encoder.encode(swapped)
                except SkipSample:
                    swapped_encoded = None
                if swapped_encoded is not None and swapped_encoded["num_turns"] == encoded["num_turns"]:
                    turns, encoded = swapped, swapped_encoded
                else:  # the swapped words would not fit: keep this sample unflipped (a mirrored crop)
                    x = x.flip(-1)
        out = {"image": x, "turns": turns}
        if encoded is not None:
            out["encoded"] = encoded
        return out

    def collate(self, samples: list[dict]) -> dict:
        out = {"image": torch.stack([s["image"] for s in samples]), "turns": [s["turns"] for s in samples]}
        if self.encoder is not None:
            out.update(self.encoder.collate([s["encoded"] for s in samples]))
        return out


def _collate_eval(items: list[tuple]) -> dict:
    return {"image": torch.stack([i for i, _ in items]), "turns": [t for _, t in items]}


def load_instruction_set(path: str | Path, image_size: int, batch_size: int, workers: int = 0,
                         limit: Optional[int] = None) -> DataLoader:
    """One ordered pass over instruction shards (a folder of `*.tar`, a `test/` sub-folder, or a shard
    spec): batches {"image": float [B, 3, S, S] (eval preprocessing), "turns": per-image turn lists}."""
    from pe_lightning.data.classification import EvalShardDataset, resolve_benchmark

    shards, _ = resolve_benchmark(path, "test")

    def fn(raw: dict) -> tuple[torch.Tensor, list[dict]]:
        turns = decode_turns(raw)
        return eval_transform(decode_image(raw), image_size), turns

    ds = EvalShardDataset(shards, fn, limit=limit, name=str(path))
    return DataLoader(ds, batch_size=batch_size, num_workers=min(workers, len(shards)), collate_fn=_collate_eval)
