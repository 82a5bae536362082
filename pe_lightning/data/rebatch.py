"""Fixed-size chunks from the workers -> batches of the *current* batch size, with a resumable position.

`StreamLoader` is what `train_dataloader()` returns. Each `iter()` starts a DataLoader over the rank's
`StreamDataset` at the current position (workers skip what was consumed, see stream.py) and concatenates
chunks into batches of `batch_size` samples; the batch size may change between any two batches (set
`loader.batch_size`, or give `batch_size_fn(samples_consumed) -> int`), as long as it is a multiple of
`chunk_size`. Nothing restarts: the stream simply continues.

An "epoch" is bookkeeping only: `len(loader)` = samples per rank per pass // batch size, the same on every
rank (no DDP hang); iteration stops after that many samples and the next `iter()` continues the stream.
Because the loader has a length, Lightning does not prefetch from it, so the position at a checkpoint is
exactly the samples the training steps consumed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from pe_lightning.data.stream import ChunkMeta, StreamDataset

log = logging.getLogger(__name__)

__all__ = ["StreamLoader", "concat_chunks", "check_batch_size"]


def check_batch_size(batch_size: int, chunk_size: int) -> int:
    bs = int(batch_size)
    if bs <= 0 or bs % chunk_size:
        raise ValueError(f"batch size {batch_size} is not a positive multiple of data.chunk_size={chunk_size}: "
                         f"workers produce chunks of {chunk_size} samples and batches are whole chunks; use a "
                         f"multiple of {chunk_size} (e.g. {max(1, round(bs / chunk_size)) * chunk_size}) or "
                         "change data.chunk_size")
    return bs


def concat_chunks(chunks: list[dict]) -> dict:
    """Concatenate chunk dicts: tensors along dim 0, lists by extension (key order of the first chunk)."""
    out: dict[str, Any] = {}
    for k, v in chunks[0].items():
        if isinstance(v, torch.Tensor):
            out[k] = v if len(chunks) == 1 else torch.cat([c[k] for c in chunks], 0)
        elif isinstance(v, list):
            out[k] = [x for c in chunks for x in c[k]]
        else:
            out[k] = [c[k] for c in chunks]
    return out


class StreamLoader:
    """Iterable of batches over a rank's chunk stream; holds the stream position."""

    def __init__(
        self,
        make_dataset: Callable[[int, dict[int, dict], int, int], StreamDataset],
        *,
        chunk_size: int,
        streams: int,
        workers: int,
        samples_per_epoch: int,
        batch_size: Optional[int] = None,
        batch_size_fn: Optional[Callable[[int], int]] = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        multiprocessing_context: Any = None,
    ):
        """`make_dataset(start_chunk, slot_starts, stream_origin, streams)`; `samples_per_epoch` per rank."""
        self.make_dataset = make_dataset
        self.chunk_size = int(chunk_size)
        self.streams = int(streams)
        self.workers = int(workers)
        self.samples_per_epoch = int(samples_per_epoch)
        self._batch_size = check_batch_size(batch_size or chunk_size, chunk_size)
        self.batch_size_fn = batch_size_fn
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        # position
        self.samples_consumed = 0
        self.stream_origin = 0  # chunk index where the current stream order began (0 unless restarted)
        self.cursors: dict[int, dict] = {}
        self._skipped: Counter = Counter()
        self._generation = 0
        self._last_log = 0.0
        # the DataModule that owns this loader: Lightning saves/restores the loader's state_dict (it treats any
        # loader with state_dict/load_state_dict as resumable), and the owner's state covers every rank
        self.owner: Any = None

    # ----- batch size -----
    @property
    def batch_size(self) -> int:
        if self.batch_size_fn is not None:
            return check_batch_size(self.batch_size_fn(self.samples_consumed), self.chunk_size)
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = check_batch_size(value, self.chunk_size)
        self.batch_size_fn = None

    @property
    def chunks_consumed(self) -> int:
        return self.samples_consumed // self.chunk_size

    def effective_workers(self) -> int:
        """Largest worker count <= `workers` that divides the stream count (0 = in-process)."""
        if self.workers <= 0:
            return 0
        return max(w for w in range(1, min(self.workers, self.streams) + 1) if self.streams % w == 0)

    def __len__(self) -> int:
        return max(1, self.samples_per_epoch // self.batch_size)

    # ----- iteration -----
    def _slot_starts(self) -> dict[int, dict]:
        return {s: ({"cursor": self.cursors[s]} if s in self.cursors else {"replay_from": self.stream_origin})
                for s in range(self.streams)}

    def _dataloader(self) -> DataLoader:
        ds = self.make_dataset(self.chunks_consumed, self._slot_starts(), self.stream_origin, self.streams)
        w = self.effective_workers()
        if w != self.workers and self.workers > 0:
            log.warning("data: %d streams cannot be split over %d workers; using %d workers", self.streams,
                        self.workers, w)
        kwargs: dict[str, Any] = {}
        if w > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, persistent_workers=False,
                          worker_init_fn=_worker_init, multiprocessing_context=self.multiprocessing_context)
        return DataLoader(ds, batch_size=None, num_workers=w, pin_memory=self.pin_memory, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        self._generation += 1
        gen = self._generation
        return self._batches(gen)

    def _batches(self, gen: int) -> Iterator[dict]:
        it = iter(self._dataloader())
        done_this_epoch = 0
        try:
            while gen == self._generation:
                bs = self.batch_size
                if done_this_epoch and done_this_epoch + bs > self.samples_per_epoch:
                    return
                chunks = []
                for _ in range(bs // self.chunk_size):
                    chunk = next(it)
                    meta = ChunkMeta.pop(chunk)
                    expected = self.chunks_consumed + len(chunks)
                    if meta.chunk != expected:
                        raise RuntimeError(f"data stream out of order: got chunk {meta.chunk}, expected {expected}")
                    chunks.append((chunk, meta))
                batch = concat_chunks([c for c, _ in chunks])
                if gen != self._generation:  # a newer iterator owns the position now
                    return
                for _, meta in chunks:
                    self.cursors[meta.slot] = meta.cursor
                    if meta.skipped:
                        self._skipped.update(meta.skipped)
                        self._log_skips()
                self.samples_consumed += bs
                done_this_epoch += bs
                yield batch
        finally:
            del it  # shuts the workers down

    def _log_skips(self) -> None:
        now = time.monotonic()
        if now - self._last_log > 60:
            self._last_log = now
            log.info("data: skipped samples so far: %s", dict(self._skipped))

    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    # ----- state -----
    def state_dict(self) -> dict:
        """The owning DataModule's state (all ranks) if any, else this rank's position."""
        return self.owner.state_dict() if self.owner is not None else self.get_state()

    def load_state_dict(self, state: dict) -> None:
        if self.owner is not None:
            self.owner.load_state_dict(state)
        else:
            self.set_state(state)

    def get_state(self) -> dict:
        return {
            "samples_consumed": self.samples_consumed,
            "stream_origin": self.stream_origin,
            "streams": self.streams,
            "cursors": {str(k): v for k, v in self.cursors.items()},
            "skipped": dict(self._skipped),
        }

    def set_state(self, state: dict) -> None:
        self._generation += 1  # any running iterator stops
        n = int(state.get("samples_consumed", 0))
        if n % self.chunk_size:
            raise ValueError(f"samples_consumed={n} is not a multiple of chunk_size={self.chunk_size}")
        self.samples_consumed = n
        self.stream_origin = int(state.get("stream_origin", 0))
        self.streams = int(state.get("streams", self.streams))
        self.cursors = {int(k): v for k, v in (state.get("cursors") or {}).items()}
        self._skipped = Counter(state.get("skipped") or {})


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
