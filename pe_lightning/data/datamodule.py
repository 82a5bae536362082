"""LightningDataModules over the resumable streams: image-text (CLIP stages), video-text, instruction.

    dm = ImageTextDataModule(cfg.data, tokenize=get_tokenizer(32), seed=cfg.seed, batch_size=256)
    for batch in dm.train_dataloader():   # {"image": float [B,3,S,S], "text": long [B,ctx]}
        ...
    dm.batch_size = 512                   # between any two steps; a multiple of data.chunk_size
    state = dm.state_dict()               # {"samples_consumed": n (this rank), "world_size", "ranks": {...}}
    dm2.load_state_dict(state)            # dm2 yields exactly the batches dm would have yielded next

With an empty source list (`data.train`, `data.video`, `data.instruct`) the shapes world under `data.root`
is used, generated on first use when `data.generate` is true. Lightning saves `state_dict()` in every
checkpoint and restores it on resume by itself (the datamodule must be passed to `trainer.fit`). Under
torch.distributed, `state_dict()` is a collective (every rank's cursors are gathered, since only rank 0
writes the checkpoint): call it on all ranks, as Lightning does.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch

from pe_lightning.data.config import AugmentConfig, DataConfig, SourceConfig
from pe_lightning.data.image_text import ImageTextDecoder
from pe_lightning.data.instruction import InstructionDecoder
from pe_lightning.data.rebatch import StreamLoader, check_batch_size
from pe_lightning.data.shards import DataError, ResolvedSource, resolve_sources
from pe_lightning.data.stream import StreamDataset, StreamSpec, probe_source
from pe_lightning.data.transforms import derive_seed
from pe_lightning.data.video_text import VideoTextDecoder, video_decoder_for

log = logging.getLogger(__name__)

__all__ = ["as_data_config", "StreamDataModule", "ImageTextDataModule", "VideoTextDataModule",
           "InstructionDataModule", "MultiDataModule"]

Tokenize = Callable[[list[str]], torch.Tensor]


def _build(cls: type, d: Any, where: str) -> Any:
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = dataclasses.asdict(d)
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise TypeError(f"{where}: unknown keys {unknown}; valid: {sorted(names)}")
    kw = dict(d)
    if cls is DataConfig:
        for k in ("train", "video", "instruct"):
            if k in kw:
                kw[k] = [_build(SourceConfig, s, f"{where}.{k}[{i}]") for i, s in enumerate(kw[k] or [])]
        if "augment" in kw:
            kw["augment"] = _build(AugmentConfig, kw["augment"], f"{where}.augment")
    return cls(**kw)


def as_data_config(cfg: Any) -> DataConfig:
    """A plain DataConfig (deep copy) from a DataConfig, an OmegaConf node or a dict."""
    if isinstance(cfg, DataConfig):
        return copy.deepcopy(cfg)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return _build(DataConfig, cfg, "data")


class ScheduledBatchSize:
    """samples consumed on this rank -> this rank's batch size, from a schedule of global batch sizes."""

    def __init__(self, schedule: Any, world_size: int):
        self.schedule, self.world_size = schedule, int(world_size)

    def __call__(self, samples_consumed_local: int) -> int:
        return self.schedule.at(samples_consumed_local * self.world_size)[1].local_batch_size(self.world_size)


class StreamDataModule(L.LightningDataModule):
    """Shared machinery; subclasses choose the sources, the shapes-world split and the decoder."""

    sources_key = "train"  # DataConfig field listing the sources
    shapes_split = "train"  # folder of the shapes world used when that list is empty

    def __init__(self, cfg: Any, tokenize: Optional[Tokenize] = None, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, batch_size: Optional[int] = None,
                 batch_size_fn: Optional[Callable[[int], int]] = None, keep_captions: bool = False,
                 schedule: Any = None):
        """
        Args:
            cfg: the `data` section (DataConfig, OmegaConf node or dict).
            tokenize: list[str] -> LongTensor [N, ctx]; runs in the workers (must be picklable under spawn).
            seed: the run's seed: fixes the shard order, shuffling and every sample's augmentation.
            rank, world_size: override torch.distributed (tests, or manual sharding).
            batch_size: samples per rank per batch (default chunk_size); settable later, multiple of chunk_size.
            batch_size_fn: alternatively, samples_consumed (this rank) -> batch size of the next batch.
            schedule: alternatively, the stage's PhaseSchedule (global batch sizes over global samples seen);
                the per-rank batch follows it once the world size is known (`setup`).
            keep_captions: also put the (possibly flip-swapped) caption strings in batches under "caption".
        """
        super().__init__()
        self.cfg = as_data_config(cfg)
        self.tokenize = tokenize
        self.seed = int(seed)
        self._rank_arg, self._world_arg = rank, world_size
        self.keep_captions = keep_captions
        c = self.cfg
        if c.chunk_size <= 0:
            raise ValueError(f"data.chunk_size must be > 0, got {c.chunk_size}")
        self._batch_size = check_batch_size(batch_size or c.chunk_size, c.chunk_size)
        self._batch_size_fn = batch_size_fn
        self.schedule = schedule
        self.streams = int(c.streams) if c.streams > 0 else max(1, int(c.workers))
        self.sources: list[ResolvedSource] = []
        self.rank, self.world_size = 0, 1
        self._loader: Optional[StreamLoader] = None
        self._pending_state: Optional[dict] = None
        self._fingerprint: Optional[str] = None
        self._is_setup = False

    # ----- what subclasses define -----
    def make_decoder(self):
        raise NotImplementedError

    def source_configs(self) -> list:
        return list(getattr(self.cfg, self.sources_key))

    @property
    def shuffle_buffer(self) -> int:
        return int(self.cfg.shuffle_buffer)

    # ----- shapes world -----
    @property
    def uses_shapes_world(self) -> bool:
        return not self.source_configs()

    def ensure_data(self) -> None:
        """Generate the shapes world when it is the data source and missing (called by prepare_data/setup)."""
        if not self.uses_shapes_world:
            return
        from pe_lightning.data.shapes.writer import ensure_shapes_world, is_complete

        c = self.cfg
        if c.generate:
            ensure_shapes_world(c.root, train=c.shapes_train, seed=c.shapes_seed, size=c.shapes_size,
                                world=c.shapes_version)
        elif not is_complete(c.root):
            raise DataError(f"no shapes world at {c.root} and data.generate=false: run `pe-lightning data shapes "
                            f"--out {c.root}`, set data.generate=true, or list your shards in data.{self.sources_key}")

    def prepare_data(self) -> None:
        self.ensure_data()

    # ----- setup -----
    def _resolve_rank(self) -> tuple[int, int]:
        if self._world_arg is not None or self._rank_arg is not None:
            world = int(self._world_arg if self._world_arg is not None else 1)
            rank = int(self._rank_arg or 0)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        return rank, world

    def setup(self, stage: Optional[str] = None) -> None:
        if self._is_setup:
            return
        self.ensure_data()
        self.rank, self.world_size = self._resolve_rank()
        if self.schedule is not None and self._batch_size_fn is None:
            self._batch_size_fn = ScheduledBatchSize(self.schedule, self.world_size)
        confs = self.source_configs()
        what = f"data.{self.sources_key}"
        if not confs:
            folder = Path(self.cfg.root) / self.shapes_split
            confs = [SourceConfig(urls=str(folder))]
            what = f"shapes world {self.shapes_split}"
        self.sources = resolve_sources(confs, what=what)
        decoder = self.make_decoder()
        for s in self.sources:
            probe_source(s, decoder)
        c = self.cfg
        self._fingerprint = hashlib.sha1(json.dumps({
            "world_size": self.world_size, "chunk_size": c.chunk_size, "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer, "resampled": c.resampled,
            "sources": [[s.shards, s.weight] for s in self.sources]}, sort_keys=True).encode()).hexdigest()
        self._is_setup = True

    @property
    def samples_per_epoch(self) -> int:
        """Samples per rank per pass (sum of the source sizes / world size)."""
        return max(1, sum(s.size for s in self.sources) // self.world_size)

    # ----- the loader -----
    def _make_dataset(self, start_chunk: int, slot_starts: dict, origin: int, streams: int) -> StreamDataset:
        c = self.cfg
        if self._rank_arg is None and self._world_arg is None:
            now = self._resolve_rank()
            if now != (self.rank, self.world_size):
                raise RuntimeError(
                    f"the data module was set up as rank {self.rank} of {self.world_size} but runs as rank {now[0]} of "
                    f"{now[1]}: it was set up before torch.distributed was initialised. Pass the datamodule to "
                    "trainer.fit(datamodule=...) (not dm.train_dataloader()), or give rank/world_size explicitly")
        spec = StreamSpec(
            sources=self.sources, seed=self.seed,
            stream_seed=self.seed if origin == 0 else derive_seed(self.seed, 0x0816, origin),
            rank=self.rank, world_size=self.world_size, streams=streams, chunk_size=c.chunk_size,
            shuffle_buffer=self.shuffle_buffer, resampled=c.resampled)
        return StreamDataset(spec, self.make_decoder(), start_chunk, slot_starts)

    def train_dataloader(self) -> StreamLoader:
        if self._loader is None:
            self.setup("fit")
            self._loader = StreamLoader(
                self._make_dataset, chunk_size=self.cfg.chunk_size, streams=self.streams,
                workers=self.cfg.workers, samples_per_epoch=self.samples_per_epoch,
                batch_size=self._batch_size, batch_size_fn=self._batch_size_fn, pin_memory=self._on_gpu())
            self._loader.owner = self
            if self._pending_state is not None:
                self._apply_state(self._pending_state)
                self._pending_state = None
        return self._loader

    def _on_gpu(self) -> bool:
        """Batches for a GPU come in pinned memory: the copy from pageable memory would wait for the device
        to finish its queued work (a host sync every step); from pinned memory it runs asynchronously."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    @property
    def batch_size(self) -> int:
        if self._loader is not None:
            return self._loader.batch_size
        if self._batch_size_fn is None and self.schedule is not None:
            return ScheduledBatchSize(self.schedule, 1)(0)
        return self._batch_size_fn(0) if self._batch_size_fn else self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = check_batch_size(value, self.cfg.chunk_size)
        self._batch_size_fn = None
        self.schedule = None
        if self._loader is not None:
            self._loader.batch_size = value

    @property
    def samples_consumed(self) -> int:
        """Samples this rank's training steps have taken from the stream."""
        if self._loader is not None:
            return self._loader.samples_consumed
        return int((self._pending_state or {}).get("samples_consumed", 0))

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far on this rank, per reason (bad_image, empty_caption, tar_error, ...)."""
        if self._loader is not None:
            return self._loader.skipped()
        return {}

    # ----- state -----
    def _gathering(self) -> bool:
        return (self._rank_arg is None and self._world_arg is None and torch.distributed.is_available()
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)

    def state_dict(self) -> dict:
        if self._loader is not None:
            local = self._loader.get_state()
        elif self._pending_state is not None:
            return copy.deepcopy(self._pending_state)
        else:
            local = {"samples_consumed": 0}
        local["fingerprint"] = self._fingerprint
        if self._gathering():
            states: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, local)
            ranks = {str(r): s for r, s in enumerate(states)}
        else:
            ranks = {str(self.rank): local}
        return {"samples_consumed": local["samples_consumed"], "world_size": self.world_size, "ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        state = copy.deepcopy(dict(state_dict))
        if self._loader is None:
            self._pending_state = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: dict) -> None:
        loader = self._loader
        assert loader is not None
        chunk = self.cfg.chunk_size
        n = int(state.get("samples_consumed", 0))
        saved_world = int(state.get("world_size", self.world_size))
        mine = (state.get("ranks") or {}).get(str(self.rank))
        if saved_world != self.world_size:
            n = (n * saved_world // self.world_size) // chunk * chunk
            log.warning("data: resuming with world size %d (saved with %d): the stream restarts with a fresh order "
                        "at %d samples per rank", self.world_size, saved_world, n)
            loader.set_state({"samples_consumed": n, "stream_origin": n // chunk, "skipped": {}})
        elif mine is None:
            log.warning("data: no saved stream cursors for rank %d: replaying %d samples to reach the position",
                        self.rank, n)
            loader.set_state({"samples_consumed": n, "stream_origin": 0})
        elif mine.get("fingerprint") not in (None, self._fingerprint):
            log.warning("data: the data config changed since the checkpoint (sources, chunk size, seed, shuffle "
                        "or world size): the stream restarts with a fresh order at %d samples", n)
            loader.set_state({"samples_consumed": n, "stream_origin": n // chunk, "skipped": mine.get("skipped")})
        else:
            loader.set_state(mine)
            if loader.streams != self.streams:
                log.info("data: keeping the checkpoint's %d reader streams (config says %d)", loader.streams,
                         self.streams)


class ImageTextDataModule(StreamDataModule):
    """Image-text batches {"image": float [B,3,S,S], "text": long [B,ctx]} (S = data.image_size)."""

    sources_key = "train"
    shapes_split = "train"

    def make_decoder(self) -> ImageTextDecoder:
        return ImageTextDecoder(self.cfg.image_size, self.cfg.augment, self.tokenize, self.seed,
                                keep_captions=self.keep_captions)


class VideoTextDataModule(StreamDataModule):
    """Video-text batches {"video": float [B,T,3,S,S], "text": long [B,ctx]} (T = data.num_frames)."""

    sources_key = "video"
    shapes_split = "video/train"

    @property
    def shuffle_buffer(self) -> int:
        return int(self.cfg.video_shuffle_buffer)

    def make_decoder(self) -> VideoTextDecoder:
        return video_decoder_for(self.cfg, self.tokenize, self.seed, keep_captions=self.keep_captions)


class InstructionDataModule(StreamDataModule):
    """Instruction batches {"image": float [B,3,S,S], "turns": list of lists of {question, answer}}."""

    sources_key = "instruct"
    shapes_split = "instruct"

    def make_decoder(self) -> InstructionDecoder:
        return InstructionDecoder(self.cfg.image_size, self.cfg.augment, self.seed)


class ZipLoader:
    """Steps over several StreamLoaders at once: each batch is {name: that loader's batch}."""

    def __init__(self, loaders: dict[str, StreamLoader], owner: Any = None):
        self.loaders = loaders
        self.owner = owner

    def __len__(self) -> int:
        return min(len(v) for v in self.loaders.values())

    def __iter__(self):
        its = {k: iter(v) for k, v in self.loaders.items()}
        for _ in range(len(self)):
            try:
                yield {k: next(it) for k, it in its.items()}
            except StopIteration:
                return

    def state_dict(self) -> dict:
        return self.owner.state_dict() if self.owner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.owner is not None:
            self.owner.load_state_dict(state)


class MultiDataModule(L.LightningDataModule):
    """Several stream datamodules stepped together, e.g. the video stage's image + video batches:

        dm = MultiDataModule(image=ImageTextDataModule(...), video=VideoTextDataModule(...))
        batch = {"image": {"image", "text"}, "video": {"video", "text"}}

    Each part keeps its own position, batch size (`dm.parts["video"].batch_size = ...`) and skip counts; an
    epoch is the shortest part's. State: {name: part.state_dict()}."""

    def __init__(self, **parts: StreamDataModule):
        super().__init__()
        if not parts:
            raise ValueError("MultiDataModule needs at least one part")
        self.parts = parts
        self._loader: Optional[ZipLoader] = None

    def prepare_data(self) -> None:
        for p in self.parts.values():
            p.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        for p in self.parts.values():
            if p.trainer is None and self.trainer is not None:
                p.trainer = self.trainer
            p.setup(stage)

    def train_dataloader(self) -> ZipLoader:
        if self._loader is None:
            self.setup("fit")
            self._loader = ZipLoader({k: p.train_dataloader() for k, p in self.parts.items()}, owner=self)
        return self._loader

    def state_dict(self) -> dict:
        return {k: p.state_dict() for k, p in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for k, p in self.parts.items():
            if k in state_dict:
                p.load_state_dict(state_dict[k])

    def skipped(self) -> dict[str, int]:
        return {f"{k}/{reason}": n for k, p in self.parts.items() for reason, n in p.skipped().items()}
