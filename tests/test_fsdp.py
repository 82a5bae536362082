"""`trainer.strategy=fsdp` (FSDP2 through Lightning's ModelParallelStrategy, sharding.py) with LAMB, on CPU with
two gloo processes: the sharded LAMB step equals one process's, a whole stage ends with the weights DDP ends with,
a sharded checkpoint resumes exactly, and activation checkpointing and bf16 run under it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_MODEL, tiny_run
from pe_lightning.stages.lamb import FusedLamb
from pe_lightning.stages.optim import build_optimizer, param_groups

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, max_grad_norm=1.0)


class _Net(nn.Module):
    """Uneven shapes (15 rows over 2 ranks, a 1-row bias on rank 1), a norm and a scalar, as in PE's CLIP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.norm, self.b = nn.Linear(8, 15), nn.LayerNorm(15), nn.Linear(15, 3)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.norm(self.a(x)))) * self.logit_scale


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, rank: int = 0, world: int = 1) -> None:
    """Each rank its half of one batch (the loss a mean over the whole batch, as DDP and FSDP average)."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) ** 2).mean() * 30).backward()
        if world > 1:
            from pe_lightning.sharding import average_replicated_grads

            average_replicated_grads([p for p in model.parameters() if not hasattr(p, "placements")], None)
        opt.step()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank: int, world: int, port: int, out: str, compile: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from pe_lightning.sharding import shard_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _Net()
    replicated = shard_module(model, init_device_mesh("cpu", (world,)))
    assert [p.ndim for p in replicated] == [0]  # the scalar: fully_shard refuses it, every rank holds it whole
    opt = build_optimizer(param_groups(model, 0.1), "lamb", HYPER["lr"], 0.1, HYPER["betas"], HYPER["eps"],
                          grad_clip=1.0, compile=compile)
    _train(model, opt, 5, rank, world)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"params": full, "grad_norm": opt.last_grad_norm, "type": type(opt).__name__}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sharded_lamb_equals_one_process(tmp_path, compile):
    """Trust ratios from whole-weight norms and the clip from the whole gradient's norm, summed over shards:
    two ranks end where one process does (a per-shard norm would not: the clip acts every step here)."""
    out = tmp_path / "sharded.pt"
    torch.multiprocessing.spawn(_sharded_worker, args=(2, _free_port(), str(out), compile), nprocs=2)
    sharded = torch.load(out, weights_only=False)
    assert sharded["type"] == "FusedLamb"  # optim.compile=false under FSDP: FusedLamb eager, not timm's
    model = _Net()
    opt = FusedLamb(param_groups(model, 0.1), **HYPER)
    _train(model, opt, 5)
    torch.testing.assert_close(sharded["grad_norm"], opt.last_grad_norm, rtol=1e-5, atol=0)
    assert opt.last_grad_norm > 1.0  # clipping acted
    for name, p in model.named_parameters():
        torch.testing.assert_close(sharded["params"][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_maps_to_fsdp2_on_every_rank_and_lamb_under_fsdp1_is_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    from pe_lightning.sharding import ShardedDataParallel, build_strategy, mixed_precision_policy

    assert isinstance(build_strategy("fsdp"), ShardedDataParallel)
    assert build_strategy("fsdp")._save_distributed_checkpoint
    assert build_strategy("ddp") == "ddp"
    assert mixed_precision_policy("bf16-mixed").param_dtype == torch.bfloat16
    assert mixed_precision_policy("bf16-mixed").reduce_dtype == torch.float32
    assert not mixed_precision_policy("bf16-mixed").cast_forward_inputs  # RoPE's cos/sin stay fp32
    assert mixed_precision_policy("32-true") is None
    assert not isinstance(build_strategy("fsdp"), FSDPStrategy)


def test_units_are_the_blocks_the_head_and_torch_layers():
    from pe_lightning.models import build_model
    from pe_lightning.sharding import _units

    model = build_model("tiny")
    names = {id(m): n for n, m in model.named_modules()}
    units = [names[id(u)] for u in _units(model)]
    blocks = [n for n in units if ".resblocks." in n or n.startswith("transformer.resblocks.")]
    assert len(blocks) == len(model.visual.transformer.resblocks) + len(model.transformer.resblocks)
    assert "visual.attn_pool" in units and "token_embedding" in units and "ln_final" in units
    assert not any(n.startswith("visual.attn_pool.") for n in units)  # inside a unit: not a unit of its own
    inside = {id(p) for u in _units(model) for p in u.parameters()}
    whole = [n for n, p in model.named_parameters() if id(p) not in inside]
    assert set(whole) <= {"logit_scale", "positional_embedding", "text_projection", "visual.class_embedding",
                          "visual.positional_embedding", "visual.proj", "visual.mask_token"}, whole


# ----- whole stages, as a user launches them: `make stage=pretrain trainer.devices=2 trainer.strategy=...` -----
TWO = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.threads=1", "data.chunk_size=8",
       "train.phases=[{until_samples: 64, resolution: 16, batch_size: 32},"
       " {until_samples: 192, resolution: 32, batch_size: 32}]", "optim.compile=false"]
FSDP = [*TWO, "trainer.strategy=fsdp", "model.vision.grad_checkpointing=true", "model.text.grad_checkpointing=true"]
DDP = [*TWO, "trainer.strategy=ddp"]
CALLBACKS = "callbacks=[{name: checkpoint}]"

STOP_AFTER = '''
import lightning as L
class StopAfter(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= 3:
            trainer.should_stop = True
'''


def _run(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pe_lightning.cli", "train", "stage=pretrain", *overrides],
                          capture_output=True, text=True, timeout=600)


def _export(runs_dir: Path) -> dict:
    return torch.load(runs_dir / "t" / "pretrain" / "export" / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def fsdp_run(tiny_world, tmp_path_factory):
    """One uninterrupted two-process FSDP pretrain run with LAMB (activation checkpointing on both towers), with
    the recipe's callbacks: the final evals run on rank 0's gathered whole model."""
    runs = tmp_path_factory.mktemp("fsdp_whole")
    done = _run(tiny_run(tiny_world, runs, *FSDP, "callbacks=[{name: checkpoint}, {name: throughput}, {name: clip_eval}]"))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((runs / "t" / "pretrain" / "export" / "metrics.json").read_text())
    assert 0 <= metrics["zeroshot_top1"] <= 1 and metrics["samples_seen"] == 192
    return runs


@pytest.mark.slow
def test_fsdp_lamb_ends_with_the_weights_of_ddp(tiny_world, tmp_path, fsdp_run):
    ddp = _run(tiny_run(tiny_world, tmp_path, *DDP, CALLBACKS))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _export(tmp_path), _export(fsdp_run)
    assert a.keys() == b.keys()  # one Meta-layout file, whole weights, as from DDP
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-4, key
    init = tmp_path / "init"
    fresh = _run(tiny_run(tiny_world, init, *DDP, CALLBACKS, "train.total_samples=32", "optim.warmup_samples=0",
                          "train.phases=[{until_samples: 32, resolution: 16, batch_size: 32}]", "optim.lr=0"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    moved = [k for k, v in _export(init).items() if not torch.equal(v, a[k])]
    assert len(moved) > len(a) // 2  # the runs trained: equality is not two untouched initialisations


@pytest.mark.slow
def test_fsdp_stopped_and_resumed_equals_uninterrupted(tiny_world, tmp_path, fsdp_run):
    stop_file = tmp_path / "stop_after.py"
    stop_file.write_text(STOP_AFTER)
    stopped = _run(tiny_run(tiny_world, tmp_path, *FSDP, f"callbacks=[{{name: checkpoint}}, {{name: '{stop_file}'}}]"))
    assert stopped.returncode != 0 and "run the same command again to resume" in stopped.stderr, \
        stopped.stderr[-3000:]
    ckpt = tmp_path / "t" / "pretrain" / "checkpoints" / "last.ckpt"
    assert ckpt.is_symlink() and ckpt.is_dir()  # sharded: a folder, each rank its own file
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    assert len(list(ckpt.parent.glob("last-*.ckpt"))) == 1  # the folders it replaced are gone

    resumed = _run(tiny_run(tiny_world, tmp_path, *FSDP, CALLBACKS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming stage pretrain" in resumed.stderr
    a, b = _export(fsdp_run), _export(tmp_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_fsdp_bf16_gathers_in_bf16_and_trains(tiny_world, tmp_path, fsdp_run):
    """trainer.precision=bf16-mixed under FSDP: bf16 gathers, fp32 reductions and fp32 sharded weights; on CPU."""
    done = _run(tiny_run(tiny_world, tmp_path, *FSDP, CALLBACKS, "trainer.precision=bf16-mixed"))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _export(fsdp_run), _export(tmp_path)
    assert all(v.dtype == torch.float32 for v in b.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < worst < 0.05, worst  # bf16 rounding, not another run


# ----- every other stage that trains with LAMB: FSDP ends where DDP ends -----
ONE_PHASE = ["train.phases=[{until_samples: 64, resolution: 32, batch_size: 32}]", "train.total_samples=64",
             "optim.warmup_samples=16"]
STAGES = {
    "video": lambda parent, tmp: ["train.phases=[]", "video.clip_batch_size=16", "video.image_batch_size=16",
                                  "train.total_samples=64", "optim.warmup_samples=16", f"init={parent}"],
    "distill": lambda parent, tmp: [*ONE_PHASE, f"distill.teacher={parent}", "distill.feature_weight=1",
                                    "distill.feature_projection=true", "distill.scratch_baseline=false"],
    "spatial": lambda parent, tmp: [*ONE_PHASE, f"init={parent}", f"spatial.teacher={parent}",
                                    f"spatial.cache_dir={tmp / 'cache'}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_lamb_stage_under_fsdp_ends_with_the_weights_of_ddp(stage, tiny_world, tmp_path, fsdp_run):
    """video (its blend with the parent after the last step, on the gathered weights), distill (the student and
    the feature term's projector both sharded), spatial: each from the FSDP pretrain run's export."""
    parent = fsdp_run / "t" / "pretrain" / "export"
    common = [f"data.root={tiny_world}", "data.generate=false", "data.image_size=32", "data.workers=1", "run=t",
              *TWO[:4], "optim.compile=false", CALLBACKS, "trainer.progress_bar=false",
              *TINY_MODEL, *STAGES[stage](parent, tmp_path)]
    exports = {}
    for strategy in ("ddp", "fsdp"):
        done = subprocess.run([sys.executable, "-m", "pe_lightning.cli", "train", f"stage={stage}",
                               f"runs_dir={tmp_path / strategy}", f"trainer.strategy={strategy}", *common],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        exports[strategy] = torch.load(tmp_path / strategy / "t" / stage / "export" / "model.pt", weights_only=True)
    a, b = exports["ddp"], exports["fsdp"]
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-4, key


def test_memory_plan_counts_each_parameter_once_and_shards_g_below_a_40gb_card():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.memory_plan import GiB, counts, per_rank_bytes
    from pe_lightning.models import build_model

    c = counts("tiny")
    assert c["params"] == sum(p.numel() for p in build_model("tiny").parameters())
    assert 0 < c["whole"] < c["params"] and 0 < c["largest_unit"] < c["params"]
    assert per_rank_bytes(c, 1, sharded=False) == 16 * c["params"]
    sharded = 16 * (c["params"] - c["whole"]) / 8 + 16 * c["whole"] + c["largest_unit"] * 8
    assert per_rank_bytes(c, 8, sharded=True) == sharded
    g = counts("PE-Core-G14-448")
    assert 35 < per_rank_bytes(g, 1, sharded=False) / GiB < 37  # DDP: ~36 GiB before any activation
    assert per_rank_bytes(g, 8, sharded=True) / GiB < 6
