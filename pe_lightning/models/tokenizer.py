"""The CLIP BPE tokenizer (open_clip's `SimpleTokenizer`, whose vocabulary ships inside the package: no
downloads) at a model's context length: lower-cased, ftfy-cleaned, SOT 49406 ... EOT 49407, pad 0; a text
that is too long is truncated and its last token set to EOT."""

from __future__ import annotations

from functools import lru_cache
from typing import List, Union

import torch

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0


@lru_cache(maxsize=1)
def _simple_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # the BPE merges file is bundled with open_clip

    tok = SimpleTokenizer(context_length=None)
    assert tok.sot_token_id == SOT_TOKEN_ID and tok.eot_token_id == EOT_TOKEN_ID
    return tok


class Tokenizer:
    """callable(str | list[str]) -> LongTensor [N, context_length]."""

    sot_token_id = SOT_TOKEN_ID
    eot_token_id = EOT_TOKEN_ID
    pad_token_id = PAD_TOKEN_ID

    def __init__(self, context_length: int):
        if int(context_length) < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        self.context_length = int(context_length)
        self._tok = _simple_tokenizer()
        self.vocab_size = self._tok.vocab_size

    def __call__(self, texts: Union[str, List[str]]) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a string or a list of strings")
        return self._tok(texts, context_length=self.context_length)

    def encode(self, text: str) -> List[int]:
        """BPE ids of `text` without SOT/EOT and without truncation."""
        return self._tok.encode(text)

    def decode(self, tokens) -> str:
        """Text of one row of ids: SOT dropped, cut at the first EOT (padding follows it)."""
        ids = [int(t) for t in tokens]
        if ids and ids[0] == SOT_TOKEN_ID:
            ids = ids[1:]
        if EOT_TOKEN_ID in ids:
            ids = ids[:ids.index(EOT_TOKEN_ID)]
        else:
            while ids and ids[-1] == PAD_TOKEN_ID:
                ids.pop()
        return self._tok.decode(ids).strip()

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length})"


def get_tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length)
