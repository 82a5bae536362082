"""Image-text samples with the teacher's cached embeddings (the distill stage without a teacher forward).

`CachedImageTextDecoder` is the `ImageTextDecoder` whose augmentation is replayed from a teacher cache
(pe_lightning/teachers/clip_cache.py, built by `pe-lightning teacher clip`): the sample at global index i
uses stored augmentation j = augmentation_choice(seed, i, N) of its key, so the emitted pixels are the crop /
jitter / flip the cached embedding was computed on (at the teacher's own resolution), and chunks gain

    "teacher_image": [n, D]  the teacher's un-normalised image embedding of that augmentation
    "teacher_text":  [n, D]  the teacher's un-normalised text embedding of the caption as emitted
                             (left/right swapped when the augmentation flips)

in the cache's storage dtype. Everything else is ImageTextDecoder's ("image" [n, 3, S, S], "text"
[n, ctx], skip reasons). A missing, truncated or stale cache file, a sample absent from it, or a cache
built with other params (seed, augmentation, and the teacher / its resolution / N when given) raises
`TeacherCacheError` (a DataError) naming the file and the fix: it stops the run instead of training on
targets that do not match the pixels.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pe_lightning.data.image_text import ImageTextDecoder, decode_caption, decode_image
from pe_lightning.data.transforms import swap_left_right
from pe_lightning.teachers.clip_cache import (CacheShard, augment_dict, augmentation_choice, cache_path,
                                              check_params, read_cache_shard, read_manifest, unpack_params)

__all__ = ["CachedImageTextDecoder"]


class CachedImageTextDecoder(ImageTextDecoder):
    """Raw sample -> replayed augmentation + caption + the teacher's cached embeddings (training only)."""

    def __init__(self, image_size: int, augment: Any, tokenize: Optional[Callable[[list[str]], torch.Tensor]],
                 seed: int, cache_dir: str | Path, *, teacher: Optional[str] = None,
                 teacher_image_size: Optional[int] = None, num_augmentations: Optional[int] = None,
                 keep_captions: bool = False, max_open_shards: int = 8):
        """
        Args:
            image_size, augment, tokenize, seed, keep_captions: as ImageTextDecoder (the run's data.image_size,
                data.augment, the student's tokenizer, the run's seed). `augment` and `seed` must be the
                cache's.
            cache_dir: the folder `pe-lightning teacher clip --out` wrote.
            teacher, teacher_image_size, num_augmentations: when given, the cache must have been built with
                this teacher fingerprint (`teacher_fingerprint(weights)`), teacher resolution and N.
            max_open_shards: cache files kept open (memory-mapped) per process.
        """
        super().__init__(image_size, augment, tokenize, seed, train=True, keep_captions=keep_captions)
        self.cache_dir = Path(cache_dir)
        self.expected: dict = {"seed": self.seed, "augment": augment_dict(augment)}
        if teacher is not None:
            self.expected["teacher"] = str(teacher)
        if teacher_image_size is not None:
            self.expected["teacher_image_size"] = int(teacher_image_size)
        if num_augmentations is not None:
            self.expected["num_augmentations"] = int(num_augmentations)
        manifest = read_manifest(self.cache_dir)  # fail at start, not at the first sample
        check_params(manifest["params"], self.expected, f"folder {self.cache_dir}")
        self.params: dict = manifest["params"]
        self.num_augmentations = int(self.params["num_augmentations"])
        self.teacher_logit_scale: Optional[float] = manifest.get("teacher_logit_scale")
        self.max_open_shards = int(max_open_shards)
        self._open: OrderedDict[str, CacheShard] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # memory maps are reopened in each worker
        return state

    def shard(self, url: str) -> CacheShard:
        """The cache of source shard `url` (loaded and checked on first use, LRU-kept)."""
        got = self._open.get(url)
        if got is not None:
            self._open.move_to_end(url)
            return got
        got = read_cache_shard(cache_path(self.cache_dir, url), self.expected, url)
        self._open[url] = got
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return got

    def decode(self, raw: dict, index: int) -> dict:
        caption = decode_caption(raw)
        img = decode_image(raw, draft=self.draft)  # bad samples are skipped before the cache is consulted
        cache = self.shard(raw["__url__"])
        row = cache.row(raw["__key__"])
        j = augmentation_choice(self.seed, index, self.num_augmentations)
        p = unpack_params(cache.aug[row, j].tolist(), cache.source_size[row].tolist(), img.size)
        x = self.transform.apply(img, p)
        if p.flip:
            caption = swap_left_right(caption)
        return {"image": x, "caption": caption, "teacher_image": cache.image[row, j].clone(),
                "teacher_text": cache.text[row, int(p.flip)].clone()}

    def collate(self, samples: list[dict]) -> dict:
        out = super().collate(samples)
        out["teacher_image"] = torch.stack([s["teacher_image"] for s in samples])
        out["teacher_text"] = torch.stack([s["teacher_text"] for s in samples])
        return out
