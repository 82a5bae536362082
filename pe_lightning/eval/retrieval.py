"""Image <-> text retrieval recall@k (R@1/5/10), with one or several captions per image.

Conventions:
- image -> text: an image is a hit at k if **any** of its captions ranks within the top k captions.
- text -> image: a caption is a hit at k if its owner image ranks within the top k images.
- Ties count **against** the query: the rank of a positive is the number of negatives scoring >= it, so a
  collapsed model (all embeddings equal) gets recall ~0, never a flattering 1.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .zeroshot import eval_mode

__all__ = ["retrieval_eval", "recall_at_k"]


def _split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, dict):
        img = batch.get("image", batch.get("images"))
        cap = next((batch[k] for k in ("caption", "captions", "text", "texts") if k in batch), None)
        if img is None or cap is None:
            raise ValueError(f"retrieval_eval: dict batch needs 'image' and 'caption'/'text', got {list(batch)}")
        return img, cap
    return batch[0], batch[1]


def _captions_per_image(
    captions: Any, n_images: int, tokenize: Callable[[list[str]], torch.Tensor]
) -> tuple[torch.Tensor, list[int]]:
    """Normalise a batch's captions to (tokens [M, ctx], number of captions of each image)."""
    if torch.is_tensor(captions):
        if captions.ndim == 2:  # one tokenised caption per image
            counts = [1] * captions.shape[0]
            tokens = captions
        elif captions.ndim == 3:  # [B, K, ctx]: K tokenised captions per image
            counts = [captions.shape[1]] * captions.shape[0]
            tokens = captions.reshape(-1, captions.shape[-1])
        else:
            raise ValueError(f"retrieval_eval: token tensor must be [B, ctx] or [B, K, ctx], got {tuple(captions.shape)}")
    else:
        texts: list[str] = []
        counts = []
        for c in captions:
            group = [c] if isinstance(c, str) else list(c)
            if not group or not all(isinstance(t, str) for t in group):
                raise ValueError("retrieval_eval: each image needs a caption string or a non-empty list of strings")
            texts.extend(group)
            counts.append(len(group))
        tokens = tokenize(texts)
    if len(counts) != n_images:
        raise ValueError(
            f"retrieval_eval: {n_images} images but captions for {len(counts)}; yield one caption (or one list "
            "of captions) per image (a default collate transposes lists of lists: use a custom collate_fn)"
        )
    return tokens, counts


def recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    owner: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k from L2-normalised embeddings: image_emb [N, D], text_emb [M, D], owner [M] = the index of
    each caption's image. Similarities are computed in chunks of `chunk` images."""
    n, m = image_emb.shape[0], text_emb.shape[0]
    dev = image_emb.device
    owner = owner.to(dev)
    cols = torch.arange(m, device=dev)
    i2t_rank = torch.empty(n, dtype=torch.long, device=dev)
    t2i_rank = torch.zeros(m, dtype=torch.long, device=dev)
    pos_t = torch.empty(m, dtype=text_emb.dtype, device=dev)  # each caption's score with its own image
    chunks = [torch.arange(s, min(s + chunk, n), device=dev) for s in range(0, n, chunk)]
    # Two passes over the same chunks so that every score is the very number the other pass compares
    # against (ties are exact, not at the mercy of a differently-blocked matmul).
    for rows in chunks:
        sim = image_emb[rows] @ text_emb.t()  # [n_chunk, M]
        positive = owner[None, :] == rows[:, None]
        best_pos = sim.masked_fill(~positive, float("-inf")).amax(dim=1)
        i2t_rank[rows] = ((sim >= best_pos[:, None]) & ~positive).sum(dim=1)
        own = positive.any(dim=0)
        pos_t[own] = sim[owner[own] - rows[0], cols[own]]
    for rows in chunks:
        sim = image_emb[rows] @ text_emb.t()
        positive = owner[None, :] == rows[:, None]
        t2i_rank += ((sim >= pos_t[None, :]) & ~positive).sum(dim=0)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out


def retrieval_eval(
    model: Any,
    loader: Iterable[Any],
    tokenize: Callable[[list[str]], torch.Tensor],
    device: Union[str, torch.device, None] = None,
    ks: Sequence[int] = (1, 5, 10),
    preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, float]:
    """Image <-> text recall@k of `model` over `loader`.

    `loader` yields (images, captions) or dicts {'image', 'caption'|'text'}. Captions per batch are a list
    with one entry per image: a string, or a list of strings (several captions per image); or already
    tokenised [B, ctx] / [B, K, ctx] tensors. Strings are tokenised with `tokenize`. `preprocess` (optional)
    is applied to the images on the device. Returns {'i2t_r1', ..., 'i2t_r10', 't2i_r1', ..., 't2i_r10'}
    (for the given ks), fractions in [0, 1]; see the module docstring for hits and ties.
    """
    img_embs, txt_embs, owners = [], [], []
    n_seen = 0
    with torch.inference_mode(), eval_mode(model):
        for batch in loader:
            images, captions = _split_batch(batch)
            tokens, counts = _captions_per_image(captions, images.shape[0], tokenize)
            if device is not None:
                images, tokens = images.to(device), tokens.to(device)
            if preprocess is not None:
                images = preprocess(images)
            img_embs.append(F.normalize(model.encode_image(images).float(), dim=-1))
            txt_embs.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
            owners.append(torch.repeat_interleave(torch.arange(len(counts)) + n_seen, torch.tensor(counts)))
            n_seen += len(counts)
    if not img_embs:
        raise ValueError("retrieval_eval: the loader yielded no batches")
    image_emb = torch.cat(img_embs)
    text_emb = torch.cat(txt_embs).to(image_emb.device)
    return recall_at_k(image_emb, text_emb, torch.cat(owners), ks)
