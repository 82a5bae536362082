"""The distill stage's batches: image-text samples, plus what the teacher side needs.

    dm = DistillDataModule(cfg.data, tokenize=student_tok, seed=0, schedule=..., teacher_tokenize=teacher_tok)
    batch = {"image": [B, 3, S, S], "text": [B, ctx_S],          # as ImageTextDataModule (the student's)
             "teacher_tokens": [B, ctx_T]}                        # online teacher with another context length
    dm = DistillDataModule(cfg.data, tokenize=student_tok, seed=0, schedule=..., cache={...})
    batch = {"image", "text", "teacher_image": [B, D_T], "teacher_text": [B, D_T]}   # cached teacher

Online mode: a teacher whose context length differs from the student's reads its own tokens of the same
(possibly flip-swapped) captions, tokenized in the loader workers beside the student's (open_clip forces the
student's tokenizer on its teacher; we do not). With equal context lengths only "text" is emitted and the
teacher reads it. Cached mode: `CachedImageTextDecoder` replays the augmentation the cached embeddings were
computed on (pe_lightning/data/cached_image_text.py); the step runs no teacher forward.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from pe_lightning.data.cached_image_text import CachedImageTextDecoder
from pe_lightning.data.datamodule import ImageTextDataModule
from pe_lightning.data.image_text import ImageTextDecoder

__all__ = ["TeacherTokensDecoder", "DistillDataModule"]

Tokenize = Callable[[list[str]], torch.Tensor]


class TeacherTokensDecoder(ImageTextDecoder):
    """ImageTextDecoder whose batches also hold the teacher's tokens of the captions ("teacher_tokens")."""

    def __init__(self, image_size: int, augment: Any, tokenize: Tokenize, seed: int, teacher_tokenize: Tokenize,
                 keep_captions: bool = False):
        super().__init__(image_size, augment, tokenize, seed, keep_captions=keep_captions)
        self.teacher_tokenize = teacher_tokenize

    def collate(self, samples: list[dict]) -> dict:
        out = super().collate(samples)
        captions = [s["caption"] for s in samples]
        out["teacher_tokens"] = torch.as_tensor(self.teacher_tokenize(captions), dtype=torch.long)
        return out


class DistillDataModule(ImageTextDataModule):
    """ImageTextDataModule with the teacher side of the module docstring.

    `teacher_tokenize`: the teacher's tokenizer when its context length differs from the student's (else
    None). `cache`: keyword arguments of `CachedImageTextDecoder` (cache_dir, teacher, teacher_image_size)
    for the cached mode (else None). The two are exclusive: a cache holds the teacher's text embeddings."""

    def __init__(self, cfg: Any, tokenize: Tokenize, seed: int = 0, schedule: Any = None,
                 teacher_tokenize: Optional[Tokenize] = None, cache: Optional[dict] = None, **kwargs: Any):
        if teacher_tokenize is not None and cache is not None:
            raise ValueError("DistillDataModule: a cached teacher needs no teacher tokens (give one of "
                             "teacher_tokenize and cache)")
        super().__init__(cfg, tokenize=tokenize, seed=seed, schedule=schedule, **kwargs)
        self.teacher_tokenize = teacher_tokenize
        self.cache = dict(cache) if cache is not None else None

    def make_decoder(self) -> ImageTextDecoder:
        c = self.cfg
        if self.cache is not None:
            return CachedImageTextDecoder(c.image_size, c.augment, self.tokenize, self.seed,
                                          keep_captions=self.keep_captions, **self.cache)
        if self.teacher_tokenize is not None:
            return TeacherTokensDecoder(c.image_size, c.augment, self.tokenize, self.seed, self.teacher_tokenize,
                                        keep_captions=self.keep_captions)
        return super().make_decoder()
