"""The resumable stream: distribution over ranks and workers, resume, batch-size changes, mixing."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from open_clip.tokenizer import tokenize as clip_tokenize

from pe_lightning.data import DataConfig, ImageTextDataModule, SourceConfig
from pe_lightning.data.testing import write_image_text_shards

TOKENIZE = functools.partial(clip_tokenize, context_length=16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_image_text_shards(root / "a", n_shards=8, per_shard=24, caption_fn=lambda s, i: f"item a{s}-{i}")
    write_image_text_shards(root / "b", n_shards=2, per_shard=24, caption_fn=lambda s, i: f"item b{s}-{i}", seed=1)
    return root


def make_cfg(root, workers=2, chunk=4, sources=("a",), weights=None, **kw) -> DataConfig:
    weights = weights or [1.0] * len(sources)
    return DataConfig(train=[SourceConfig(urls=str(root / s), weight=w) for s, w in zip(sources, weights)],
                      workers=workers, chunk_size=chunk, image_size=16, shuffle_buffer=8, **kw)


def dm_for(root, *, seed=0, rank=None, world=None, batch=8, **kw) -> ImageTextDataModule:
    return ImageTextDataModule(make_cfg(root, **kw), tokenize=TOKENIZE, seed=seed, rank=rank, world_size=world,
                               batch_size=batch, keep_captions=True)


def take(dm, n):
    """n batches, continuing the stream across epoch ends."""
    out = []
    loader = dm.train_dataloader()
    while len(out) < n:
        for b in loader:
            out.append(b)
            if len(out) == n:
                break
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["caption"] == y["caption"]
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["text"], y["text"])


def test_batches_have_the_contract_shapes(shards):
    dm = dm_for(shards, workers=0)
    b = take(dm, 1)[0]
    assert list(b)[:2] == ["image", "text"]  # the stage counts samples from the first value
    assert b["image"].shape == (8, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["text"].shape == (8, 16) and b["text"].dtype == torch.long
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert dm.state_dict()["samples_consumed"] == 8


def test_two_ranks_two_workers_disjoint_and_equal_batch_counts(shards):
    seen, counts = {}, {}
    for rank in (0, 1):
        dm = dm_for(shards, rank=rank, world=2, workers=2, batch=8)
        loader = dm.train_dataloader()
        batches = list(loader)  # one epoch
        counts[rank] = (len(loader), len(batches))
        seen[rank] = [c for b in batches for c in b["caption"]]
    # 8 shards x 24 = 192 samples -> 96 per rank -> 12 batches of 8 on each rank
    assert counts[0] == counts[1] == (12, 12)
    for rank in (0, 1):
        assert len(set(seen[rank])) == len(seen[rank]) == 96  # no repeats within the first pass
    assert not set(seen[0]) & set(seen[1])  # ranks read disjoint data
    assert len(set(seen[0]) | set(seen[1])) == 192  # and together all of it
    # each of the 4 (rank, stream) readers owns whole shards
    shard_of = lambda c: re.match(r"item (a\d+)-", c).group(1)  # noqa: E731
    owners = {}
    for rank in (0, 1):
        for c in seen[rank]:
            owners.setdefault(shard_of(c), set()).add(rank)
    assert all(len(v) == 1 for v in owners.values())


def test_fewer_shards_than_readers_still_disjoint(shards):
    # source b has 2 shards for 2 ranks x 2 streams: shards are split into parts
    seen = {}
    for rank in (0, 1):
        dm = dm_for(shards, rank=rank, world=2, workers=2, sources=("b",), batch=4)
        seen[rank] = [c for b in take(dm, 5) for c in b["caption"]]
    assert len(set(seen[0])) == 20 and len(set(seen[1])) == 20
    assert not set(seen[0]) & set(seen[1])


def test_order_is_independent_of_worker_count(shards):
    a = take(dm_for(shards, workers=0, streams=2), 5)
    b = take(dm_for(shards, workers=2, streams=2), 5)
    assert_same(a, b)


def test_resume_equals_uninterrupted_with_workers_and_batch_size_change(shards):
    ref_dm = dm_for(shards, workers=2, batch=8)
    ref = take(ref_dm, 3)
    ref_dm.batch_size = 16
    ref += take(ref_dm, 14)  # crosses the epoch end (192 samples) and keeps going

    dm1 = dm_for(shards, workers=2, batch=8)
    first = take(dm1, 3)
    state = dm1.state_dict()
    assert state["samples_consumed"] == 24
    dm2 = dm_for(shards, workers=2, batch=8)
    dm2.load_state_dict(state)
    dm2.batch_size = 16
    rest = take(dm2, 14)
    assert_same(first + rest, ref)
    assert dm2.state_dict()["samples_consumed"] == 24 + 14 * 16


def test_resume_from_bare_position_replays_exactly(shards):
    ref = take(dm_for(shards, workers=0, batch=8), 7)
    dm = dm_for(shards, workers=0, batch=8)
    dm.load_state_dict({"samples_consumed": 32})  # no cursors: the readers replay to the position
    assert_same(take(dm, 3), ref[4:])


def test_batch_size_fn_schedule_resumes(shards):
    fn = lambda n: 8 if n < 32 else 16  # noqa: E731  (samples consumed on this rank -> next batch size)
    ref_dm = ImageTextDataModule(make_cfg(shards), tokenize=TOKENIZE, batch_size_fn=fn, keep_captions=True)
    ref = take(ref_dm, 6)
    assert [b["image"].shape[0] for b in ref] == [8, 8, 8, 8, 16, 16]
    dm1 = ImageTextDataModule(make_cfg(shards), tokenize=TOKENIZE, batch_size_fn=fn, keep_captions=True)
    take(dm1, 5)
    dm2 = ImageTextDataModule(make_cfg(shards), tokenize=TOKENIZE, batch_size_fn=fn, keep_captions=True)
    dm2.load_state_dict(dm1.state_dict())
    assert_same(take(dm2, 1), ref[5:])


def test_batch_size_must_be_a_multiple_of_chunk_size(shards):
    dm = dm_for(shards, workers=0, chunk=4)
    with pytest.raises(ValueError, match="multiple of data.chunk_size=4"):
        dm.batch_size = 10
    with pytest.raises(ValueError, match="multiple"):
        dm_for(shards, batch=6, chunk=4)


def test_different_seeds_give_different_orders(shards):
    a = take(dm_for(shards, workers=0, seed=0), 2)
    b = take(dm_for(shards, workers=0, seed=1), 2)
    assert a[0]["caption"] != b[0]["caption"]


def test_mixing_weights(shards):
    dm = dm_for(shards, workers=0, sources=("a", "b"), weights=[3.0, 1.0], batch=16)
    caps = [c for b in take(dm, 25) for c in b["caption"]]
    share_b = sum(c.startswith("item b") for c in caps) / len(caps)
    assert 0.17 < share_b < 0.33  # expected 0.25 over 400 draws


def test_config_change_restarts_stream_but_keeps_position(shards, caplog):
    dm1 = dm_for(shards, workers=0, batch=8)
    take(dm1, 2)
    dm2 = dm_for(shards, workers=0, batch=8, seed=5)  # another seed: another stream
    dm2.load_state_dict(dm1.state_dict())
    b = take(dm2, 1)
    assert b[0]["image"].shape[0] == 8
    assert dm2.samples_consumed == 24
    assert "restarts" in caplog.text


def test_skipped_counts_survive_resume(tmp_path):
    from pe_lightning.data.testing import png_bytes, write_tar

    samples = []
    for i in range(40):
        s = {"__key__": f"{i:04d}", "png": png_bytes((i, 0, 0)), "txt": f"item {i}".encode()}
        if i % 10 == 3:
            s["png"] = b"not a png"
        samples.append(s)
    write_tar(tmp_path / "00000.tar", samples)
    cfg = DataConfig(train=[SourceConfig(urls=str(tmp_path / "00000.tar"), size=40)], workers=0, chunk_size=4,
                     image_size=16, shuffle_buffer=0, resampled=False)
    ref = ImageTextDataModule(cfg, tokenize=TOKENIZE, batch_size=4)
    take(ref, 9)  # 36 good samples = one pass
    assert ref.skipped() == {"bad_image": 4}
    dm1 = ImageTextDataModule(cfg, tokenize=TOKENIZE, batch_size=4)
    take(dm1, 4)
    dm2 = ImageTextDataModule(cfg, tokenize=TOKENIZE, batch_size=4)
    dm2.load_state_dict(dm1.state_dict())
    take(dm2, 5)
    assert dm2.skipped() == {"bad_image": 4}  # not recounted after the resume


def test_lightning_fit_resume_continues_the_stream(shards, tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, i):
            self.seen.append(tuple(batch["caption"]))
            return (self.w * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(steps, ckpt=None, save=None):
        m = Recorder()
        dm = dm_for(shards, workers=2, batch=8)
        tr = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
        tr.fit(m, datamodule=dm, ckpt_path=ckpt)
        if save:
            tr.save_checkpoint(save)
        return m.seen

    full = fit(30)  # more than one epoch (24 batches of 8)
    part = fit(10, save=tmp_path / "c.ckpt")
    rest = fit(30, ckpt=str(tmp_path / "c.ckpt"))
    assert part + rest == full


def _ddp_rank(rank, world, port, root, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dm = ImageTextDataModule(make_cfg(root, workers=0), tokenize=TOKENIZE, batch_size=8, keep_captions=True)
        first = take(dm, 2)
        state = dm.state_dict()  # a collective: every rank's cursors
        ref = take(dm, 3)
        dm2 = ImageTextDataModule(make_cfg(root, workers=0), tokenize=TOKENIZE, batch_size=8, keep_captions=True)
        dm2.load_state_dict(state)
        rest = take(dm2, 3)
        queue.put((rank, dm.rank, dm.world_size, sorted(state["ranks"]),
                   [c for b in first for c in b["caption"]],
                   [b["caption"] for b in ref] == [b["caption"] for b in rest]))
    finally:
        dist.destroy_process_group()


def test_torch_distributed_ranks_and_gathered_resume_state(shards):
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 2, port, shards, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[:4] for r in results] == [(0, 0, 2, ["0", "1"]), (1, 1, 2, ["0", "1"])]
    assert not set(results[0][4]) & set(results[1][4])  # ranks from torch.distributed read disjoint data
    assert results[0][5] and results[1][5]  # each rank resumes from its own cursors exactly


def test_config_from_omegaconf_and_unknown_keys(shards):
    from omegaconf import OmegaConf

    from pe_lightning.data import as_data_config

    node = OmegaConf.create({"train": [{"urls": str(shards / "a"), "weight": 2.0}], "chunk_size": 4,
                             "augment": {"hflip": 0.0}})
    cfg = as_data_config(node)
    assert cfg.train[0].weight == 2.0 and cfg.augment.hflip == 0.0 and cfg.chunk_size == 4
    with pytest.raises(TypeError, match="unknown keys.*chunksize"):
        as_data_config({"chunksize": 4})


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_batches_for_a_gpu_come_pinned(shards, device, pinned):
    """Pageable batches would make every step's host-to-GPU copy wait for the GPU (a host sync)."""
    from types import SimpleNamespace

    dm = dm_for(shards, workers=0)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_rank=0,
                                 world_size=1)
    assert dm.train_dataloader().pin_memory is pinned
