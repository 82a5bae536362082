"""Visual question answering by greedy generation: exact match overall and per question type.

    answers = answer_questions(lm, tokenizer, projector, features, questions)        # one question per image
    metrics = vqa_eval(lm, tokenizer, projector, encode_images, loader)              # {"vqa_exact_match", ...}
    blind = vqa_eval(..., blind=True, prefix="vqa_blind")                             # the blind baseline

- `features` are the encoder's patch tokens [B, N, W] (layer k, class token stripped); the projector maps
  them to image embeddings, which are spliced into the prompt at the image positions (models/llm.py).
- Generation is greedy with a KV cache, stopped at the template's end-of-turn / eos tokens or after
  `max_new_tokens` (answers of the shapes world are one to four words). Prompts are left-padded so every
  row's next token sits in the last column; position ids count only real tokens.
- `blind=True` puts zeros where the projected image embeddings go: same prompt, same length, same positions,
  no image information. The blind baseline is a model *trained* the same way with zeros there (the stage
  passes `blind` to its training step too); evaluating an image-trained model blind measures something else.
- Normalisation (VQA-style, our choice of the common subset): lower-case, punctuation removed, the articles
  a / an / the removed, number words zero..ten written as digits, whitespace collapsed.
- Question types follow the templates of the shapes world (data/shapes/qa.py): `colour` ("What colour is
  the ...?"), `shape` ("What shape is the ... object?"), `count` ("How many ...?"), `size` ("... small or
  large?"), `position` (left / right / top / bottom / above / below / further ...), `yesno` ("Is there
  ...?"); anything else is `other` (in the overall score, no per-type key). A type with no question gets no
  key: keys are `<prefix>_exact_match`, `<prefix>_<type>_exact_match`, and `<prefix>_num_questions` /
  `<prefix>_<type>_num_questions`.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from pe_lightning.models.llm import (build_prompt, embed_inputs, pad_collate, pad_token_id, pick_image_token_id,
                                     stop_token_ids)

__all__ = ["QUESTION_TYPES", "question_type", "normalize_answer", "exact_match_metrics", "greedy_generate",
           "answer_questions", "vqa_eval"]

QUESTION_TYPES = ("colour", "shape", "count", "size", "position", "yesno")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBERS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_POSITION_WORDS = re.compile(r"\b(left|right|top|bottom|above|below|further|leftmost|rightmost)\b")


def question_type(question: str) -> str:
    """The shapes world's question type of `question` (QUESTION_TYPES or "other")."""
    q = question.strip().lower()
    if q.startswith("how many"):
        return "count"
    if re.match(r"what colou?r\b", q):
        return "colour"
    if q.startswith("what shape"):
        return "shape"
    if re.search(r"\b(small or large|large or small|big or small|small or big)\b", q):
        return "size"
    if q.startswith(("is there", "are there")):
        return "yesno"
    if _POSITION_WORDS.search(q):
        return "position"
    return "other"


def normalize_answer(text: str) -> str:
    s = text.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(_NUMBERS.get(w, w) for w in s.split())


def exact_match_metrics(predictions: Sequence[str], answers: Sequence[str], questions: Sequence[str],
                        prefix: str = "vqa") -> dict[str, float]:
    """Exact match (after `normalize_answer`) overall and per question type, as fractions in [0, 1]."""
    if not (len(predictions) == len(answers) == len(questions)):
        raise ValueError("predictions, answers and questions must have the same length")
    hits: dict[str, list[bool]] = defaultdict(list)
    for p, a, q in zip(predictions, answers, questions):
        ok = normalize_answer(p) == normalize_answer(a)
        hits["all"].append(ok)
        hits[question_type(q)].append(ok)
    out = {f"{prefix}_num_questions": float(len(hits["all"]))}
    out[f"{prefix}_exact_match"] = sum(hits["all"]) / max(1, len(hits["all"]))
    for t in QUESTION_TYPES:
        if hits.get(t):
            out[f"{prefix}_{t}_exact_match"] = sum(hits[t]) / len(hits[t])
            out[f"{prefix}_{t}_num_questions"] = float(len(hits[t]))
    return out


@torch.no_grad()
def greedy_generate(lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    stop_ids: Sequence[int], max_new_tokens: int = 8, pad_id: int = 0) -> list[list[int]]:
    """Greedy decoding from left-padded `inputs_embeds` [B, T, D] with a KV cache; returns each row's new
    tokens, stop token excluded."""
    batch = inputs_embeds.shape[0]
    device = inputs_embeds.device
    stops = torch.tensor(list(stop_ids), device=device)
    mask = attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True,
             logits_to_keep=1)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    embed = lm.get_input_embeddings()
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        done = done | torch.isin(nxt, stops)
        tokens.append(torch.where(done, torch.full_like(nxt, -1), nxt))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], 1)
        positions = positions[:, -1:] + 1
        out = lm(inputs_embeds=embed(nxt[:, None]), attention_mask=mask, position_ids=positions,
                 cache=out.cache, use_cache=True, logits_to_keep=1)
    rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(batch)]
    return [[t for t in row if t >= 0] for row in rows]


@torch.no_grad()
def answer_questions(lm: nn.Module, tokenizer: Any, projector: nn.Module, features: torch.Tensor,
                     questions: Sequence[str], blind: bool = False, max_new_tokens: int = 8,
                     template: str = "auto", system: Optional[str] = None,
                     image_token_id: Optional[int] = None) -> list[str]:
    """One generated answer per (image features [B, N, W], question) pair."""
    if features.shape[0] != len(questions):
        raise ValueError(f"{features.shape[0]} images for {len(questions)} questions")
    device = next(lm.parameters()).device
    image_embeds = projector(features.to(device))
    if blind:
        image_embeds = torch.zeros_like(image_embeds)
    image_id = pick_image_token_id(tokenizer) if image_token_id is None else image_token_id
    prompts = [build_prompt(tokenizer, q, image_embeds.shape[1], image_id, template, system) for q in questions]
    batch = pad_collate(prompts, pad_token_id(tokenizer), padding_side="left")
    embeds = embed_inputs(lm, batch["input_ids"].to(device), image_embeds, batch["image_positions"].to(device))
    new = greedy_generate(lm, embeds, batch["attention_mask"], stop_token_ids(tokenizer, lm, template, system),
                          max_new_tokens, pad_token_id(tokenizer))
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


@torch.no_grad()
def vqa_eval(lm: nn.Module, tokenizer: Any, projector: nn.Module,
             encode_images: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict], blind: bool = False,
             prefix: str = "vqa", max_questions: Optional[int] = None, max_new_tokens: int = 8,
             template: str = "auto", system: Optional[str] = None,
             on_answer: Optional[Callable[[str, str, str], None]] = None) -> dict[str, float]:
    """Answer every question of `batches` ({"image": [B,3,S,S], "turns": per-image lists of {question,
    answer}}, e.g. the instruct_test split), each on its own (single-turn prompt), and score them.

    `encode_images(images) -> features [B, N, W]` runs the vision tower; `on_answer(question, answer,
    prediction)` sees every answer (for a log or a table)."""
    was_training = (lm.training, projector.training)
    lm.eval()
    projector.eval()
    preds: list[str] = []
    golds: list[str] = []
    asked: list[str] = []
    try:
        for batch in batches:
            features = encode_images(batch["image"])
            index = [(i, t) for i, turns in enumerate(batch["turns"]) for t in turns]
            if max_questions is not None:
                index = index[:max(0, max_questions - len(asked))]
            if not index:
                break
            rows = torch.tensor([i for i, _ in index], device=features.device)
            questions = [t["question"] for _, t in index]
            answers = answer_questions(lm, tokenizer, projector, features[rows], questions, blind=blind,
                                       max_new_tokens=max_new_tokens, template=template, system=system)
            for (_, t), p in zip(index, answers):
                preds.append(p)
                golds.append(t["answer"])
                asked.append(t["question"])
                if on_answer is not None:
                    on_answer(t["question"], t["answer"], p)
            if max_questions is not None and len(asked) >= max_questions:
                break
    finally:
        lm.train(was_training[0])
        projector.train(was_training[1])
    return exact_match_metrics(preds, golds, asked, prefix=prefix)
