"""The resumable, seeded, distributed sample stream behind every training reader.

Vocabulary
- **unit**: a shard, or a 1/p part of a shard (every p-th sample) when there are fewer shards than readers.
- **slot**: one independent reader stream. Each rank has `streams` slots (S); global slot = rank * S + slot.
  DataLoader workers each serve S / W slots, so the sample order depends on S, never on the worker count.
- **chunk**: `chunk_size` decoded samples from one slot. Rank-level chunk c is made by slot c % S; the main
  process receives chunks in order c = 0, 1, 2, ... (the DataLoader round-robins its workers in order) and
  `rebatch.py` concatenates them into batches of the current batch size.

Per slot and source, epoch e is a seeded permutation of all units (same on every rank, seeded by
(seed, source, e); in order when `resampled` is false), of which the slot takes every (world * S)-th: within
an epoch, every rank and slot reads a disjoint part of the data. Each unit is shuffled through a buffer that
is drained at the unit's end, so a slot's position is the small **cursor** (epoch, unit, samples emitted)
per source plus the number of source draws: resuming re-reads at most one unit per source, without
decoding. Sources are mixed per sample by weight with counter-based draws (a pure function of (seed, slot,
draw number)). A sample's augmentation is seeded from (seed, global sample index), where the global index of
sample j of chunk c on rank r is (c * chunk_size + j) * world_size + r.

Bad samples (the decoder raises `SkipSample`) and broken shards are skipped, counted per reason and carried
to the main process inside the chunk that was being built (`chunk["__meta__"]["skipped"]`). Counting is
exact across resumes: errors met again while re-reading the consumed part of a unit are not recounted.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pe_lightning.data.shards import DataError, ResolvedSource, SkipSample, iter_tar_samples
from pe_lightning.data.transforms import derive_seed

log = logging.getLogger(__name__)

TAG_PERM, TAG_SHUF, TAG_MIX = 11, 12, 13
META = "__meta__"


class Decoder(Protocol):
    """What a reader plugs into the stream: raw tar sample -> tensors."""

    def decode(self, raw: dict, index: int) -> dict:
        """Decode + augment one sample (seeded by the global sample `index`); raise SkipSample if bad."""

    def validate(self, raw: dict) -> None:
        """Raise SkipSample exactly when `decode` would (used to replay a stream cheaply)."""

    def collate(self, samples: list[dict]) -> dict:
        """Samples -> one chunk dict (tensors with a leading batch dim, or lists)."""


@dataclass
class StreamSpec:
    """Everything that fixes a rank's sample order (picklable: sent to the workers)."""

    sources: list[ResolvedSource]
    seed: int  # augmentation seed (the run's seed)
    stream_seed: int  # order seed (= seed, or derived when a stream had to restart after a config change)
    rank: int
    world_size: int
    streams: int
    chunk_size: int
    shuffle_buffer: int
    resampled: bool
    max_consecutive_bad: int = 10_000
    log_first: int = 5  # detailed warnings per reason and slot; later ones only counted

    @property
    def n_gslots(self) -> int:
        return self.world_size * self.streams


class SkipCounter:
    """Per-reason counts; logs the first few occurrences with details."""

    def __init__(self, where: str, log_first: int = 5):
        self.where = where
        self.counts: Counter = Counter()
        self.logged: Counter = Counter()
        self.enabled = True
        self.log_first = log_first

    def __call__(self, reason: str, detail: str = "") -> None:
        if not self.enabled:
            return
        self.counts[reason] += 1
        if self.logged[reason] < self.log_first:
            self.logged[reason] += 1
            more = " (further ones are only counted)" if self.logged[reason] == self.log_first else ""
            log.warning("data %s: skipped sample (%s): %s%s", self.where, reason, detail, more)

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out


def unit_list(n_shards: int, n_gslots: int, stream_seed: int, src_idx: int, epoch: int, gslot: int,
              shuffle: bool) -> list[tuple[int, int, int]]:
    """This slot's units (shard, part, parts) for one epoch of one source."""
    parts = max(1, math.ceil(n_gslots / n_shards))
    n_units = n_shards * parts
    if shuffle:
        rng = np.random.Generator(np.random.PCG64(derive_seed(stream_seed, TAG_PERM, src_idx, epoch)))
        order = rng.permutation(n_units)
    else:
        order = np.arange(n_units)
    return [(int(u) // parts, int(u) % parts, parts) for u in order[gslot::n_gslots]]


def shuffled(items: Iterator, rng: Optional[np.random.Generator], bufsize: int) -> Iterator:
    """Deterministic buffer shuffle, drained at the end of `items`."""
    if rng is None or bufsize <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        i = int(rng.integers(bufsize))
        y, buf[i] = buf[i], x
        yield y
    while buf:
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


class SourceStream:
    """Raw samples of one source for one slot, with the cursor after each: (epoch, unit, emitted)."""

    def __init__(self, spec: StreamSpec, src_idx: int, gslot: int, cursor: Optional[list], counter: SkipCounter):
        self.spec = spec
        self.src = spec.sources[src_idx]
        self.src_idx = src_idx
        self.gslot = gslot
        self.cursor = tuple(cursor) if cursor else (0, 0, 0)
        self.counter = counter

    def __iter__(self) -> Iterator[tuple[dict, tuple[int, int, int]]]:
        spec, src = self.spec, self.src
        epoch, pos, skip = (int(v) for v in self.cursor)
        shuffle = spec.resampled
        empty_units = 0
        while True:
            units = unit_list(len(src.shards), spec.n_gslots, spec.stream_seed, self.src_idx, epoch, self.gslot,
                              shuffle)
            while pos < len(units):
                shard, part, parts = units[pos]
                url = src.shards[shard]
                emitted = 0

                def on_error(reason: str, detail: str) -> None:
                    # an error met before the resume point was counted before the checkpoint
                    if emitted >= skip:
                        self.counter(reason, detail)

                raw_iter = iter_tar_samples(url, on_error)
                if parts > 1:
                    raw_iter = (r for i, r in enumerate(raw_iter) if i % parts == part)
                rng = None
                if shuffle and spec.shuffle_buffer > 1:
                    rng = np.random.Generator(np.random.PCG64(
                        derive_seed(spec.stream_seed, TAG_SHUF, self.src_idx, epoch, pos, self.gslot)))
                for raw in shuffled(raw_iter, rng, spec.shuffle_buffer):
                    emitted += 1
                    if emitted <= skip:
                        continue
                    yield raw, (epoch, pos, emitted)
                if emitted == 0:
                    empty_units += 1
                    if empty_units > 2 * max(1, len(units)) + 2:
                        raise DataError(f"source {src.name}: slot {self.gslot} read {empty_units} units in a row "
                                        "without a single sample; the shards are empty or unreadable")
                else:
                    empty_units = 0
                skip = 0
                pos += 1
            epoch, pos = epoch + 1, 0


class SlotStream:
    """One slot of one rank: mixes its sources, decodes, and cuts fixed-size chunks."""

    def __init__(self, spec: StreamSpec, slot: int, decoder: Decoder, first_chunk: int, start: Optional[dict]):
        self.spec = spec
        self.slot = slot
        self.gslot = spec.rank * spec.streams + slot
        self.decoder = decoder
        self.counter = SkipCounter(f"rank {spec.rank} stream {slot}", spec.log_first)
        start = start or {"replay_from": first_chunk}
        cursor = start.get("cursor")
        n = len(spec.sources)
        if cursor is not None:
            self.draws = int(cursor["draws"])
            self.cursors = [tuple(c) for c in cursor["sources"]]
            if len(self.cursors) != n:
                raise ValueError(f"stream cursor has {len(self.cursors)} sources, the data config has {n}")
        else:
            self.draws = 0
            self.cursors = [(0, 0, 0)] * n
        self.iters = [iter(SourceStream(spec, i, self.gslot, self.cursors[i], self.counter)) for i in range(n)]
        w = np.array([s.weight for s in spec.sources], dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.next_chunk = first_chunk
        if cursor is None:
            origin = int(start.get("replay_from", first_chunk))
            first_from_origin = origin + ((slot - origin) % spec.streams)
            replay = max(0, (first_chunk - first_from_origin) // spec.streams)
            if replay:
                log.info("data rank %d stream %d: no saved cursor, replaying %d chunks to reach chunk %d",
                         spec.rank, slot, replay, first_chunk)
                self.counter.enabled = False  # these were counted before the checkpoint
                for _ in range(replay):
                    self._fill(None, validate_only=True)
                self.counter.enabled = True

    def _choose(self) -> int:
        if len(self.cum) == 1:
            return 0
        u = derive_seed(self.spec.stream_seed, TAG_MIX, self.gslot, self.draws) / float(1 << 63)
        return int(min(np.searchsorted(self.cum, u, side="right"), len(self.cum) - 1))

    def _fill(self, chunk: Optional[int], validate_only: bool = False) -> list[dict]:
        spec = self.spec
        samples: list[dict] = []
        bad_run = 0
        while len(samples) < spec.chunk_size:
            s = self._choose()
            self.draws += 1
            raw, self.cursors[s] = next(self.iters[s])
            try:
                if validate_only:
                    self.decoder.validate(raw)
                    samples.append({})
                else:
                    index = (chunk * spec.chunk_size + len(samples)) * spec.world_size + spec.rank
                    samples.append(self.decoder.decode(raw, index))
                bad_run = 0
            except SkipSample as e:
                self.counter(e.reason, f"{raw.get('__url__')} key {raw.get('__key__')}: {e.detail}")
                bad_run += 1
                if bad_run >= spec.max_consecutive_bad:
                    raise DataError(f"data rank {spec.rank} stream {self.slot}: {bad_run} bad samples in a row "
                                    f"(last: {e.reason} in {raw.get('__url__')}); the data looks unusable")
        return samples

    def chunk(self, c: int) -> dict:
        if c != self.next_chunk:
            raise RuntimeError(f"stream {self.slot} asked for chunk {c}, expected {self.next_chunk}")
        samples = self._fill(c)
        out = self.decoder.collate(samples)
        out[META] = {
            "chunk": c,
            "slot": self.slot,
            "cursor": {"draws": self.draws, "sources": [list(x) for x in self.cursors]},
            "skipped": self.counter.take(),
        }
        self.next_chunk += self.spec.streams
        return out


class StreamDataset(IterableDataset):
    """Infinite chunk stream of one rank, from chunk `start_chunk` on. Worker w of W makes the chunks
    c = start_chunk + w + k W (k = 0, 1, ...), which the DataLoader returns in order."""

    def __init__(self, spec: StreamSpec, decoder: Decoder, start_chunk: int, slot_starts: dict[int, dict]):
        super().__init__()
        self.spec = spec
        self.decoder = decoder
        self.start_chunk = int(start_chunk)
        self.slot_starts = dict(slot_starts)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        if info is not None:
            torch.set_num_threads(1)
        S = self.spec.streams
        if S % n_workers:
            raise ValueError(f"{S} streams cannot be split over {n_workers} workers")
        slots: dict[int, SlotStream] = {}
        c = self.start_chunk + wid
        while True:
            s = c % S
            if s not in slots:
                slots[s] = SlotStream(self.spec, s, self.decoder, c, self.slot_starts.get(s))
            yield slots[s].chunk(c)
            c += n_workers


def probe_source(src: ResolvedSource, decoder: Decoder, max_samples: int = 64, max_shards: int = 3) -> dict:
    """Start-up check: decode up to `max_samples` raw samples from the first shards; error if none is usable."""
    reasons: Counter = Counter()
    seen = 0
    for url in src.shards[:max_shards]:
        for raw in iter_tar_samples(url, lambda reason, detail: reasons.update([reason])):
            seen += 1
            try:
                decoder.validate(raw)
                return {"usable": True, "seen": seen}
            except SkipSample as e:
                reasons[e.reason] += 1
            if seen >= max_samples:
                break
        if seen >= max_samples:
            break
    why = ", ".join(f"{k}: {v}" for k, v in reasons.most_common())
    shards = min(len(src.shards), max_shards)
    if seen == 0:  # nothing to decode at all: not tar files, or empty ones
        raise DataError(f"source {src.name}: the first {shards} shard(s) hold no samples ({why or 'empty'}): "
                        f"{src.shards[0]} is {'not a readable tar archive' if 'tar_error' in reasons else 'empty'}. "
                        "Give webdataset .tar shards (as img2dataset or video2dataset write them)")
    raise DataError(f"source {src.name}: no usable sample among the first {seen} samples of {shards} shard(s) "
                    f"({why}). Check that the shards hold the expected members (image .jpg/.png/.webp or video "
                    ".mp4, plus a .txt caption)")


@dataclass
class ChunkMeta:
    chunk: int
    slot: int
    cursor: dict
    skipped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def pop(cls, chunk: dict) -> "ChunkMeta":
        m: dict[str, Any] = chunk.pop(META)
        return cls(chunk=int(m["chunk"]), slot=int(m["slot"]), cursor=m["cursor"], skipped=dict(m["skipped"]))
