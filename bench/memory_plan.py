"""Training memory per GPU for each PE-Core preset under DDP and FSDP (`trainer.strategy=fsdp`), from the model.

    .venv/bin/python bench/memory_plan.py                      # the computed table (README, "Many GPUs and nodes")
    .venv/bin/python bench/memory_plan.py --measure T,S        # + the measured CPU peak per rank (1 and 2 gloo ranks)

Computed per rank, fp32 master weights (what `bf16-mixed` keeps too), activations not included (they depend on
the batch and on `model.*.grad_checkpointing`):
  DDP:      16 B per parameter: weights 4 + gradients 4 + LAMB's two moments 8.
  FSDP (N): 16 B per sharded parameter / N + 16 B per parameter every rank holds whole (sharding.py: the
            towers' own embeddings and projections) + the units gathered while they run: two at a time
            (the running one and the prefetched next) in the gather dtype, plus one unit's unsharded gradient
            in fp32 before its reduce-scatter.
Measured (`--measure`): one process per rank, CPU and gloo, the model sharded as the fsdp strategy does (or
whole, for 1 rank = DDP's per-rank state), three steps of CLIP loss + FusedLamb (eager) at batch 2, 64 px: the
peak resident memory during the steps (VmHWM, reset after set-up) minus the resident memory before the model
was built. It includes activations, allocator slack and eager LAMB's temporaries, so it sits above the state.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pe_lightning.models import build_model  # noqa: E402
from pe_lightning.sharding import _units  # noqa: E402

PRESETS = {"T": "PE-Core-T16-384", "S": "PE-Core-S16-384", "B": "PE-Core-B16-224", "L": "PE-Core-L14-336",
           "G": "PE-Core-G14-448"}
GiB = 1024 ** 3


def counts(preset: str) -> dict[str, int]:
    """Parameters of the PE-Core preset (vision + text): all, those every rank keeps whole under FSDP, and the
    largest FSDP unit (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_model(preset)
    units = _units(model)
    inside = {id(p) for unit in units for p in unit.parameters()}
    return {"params": sum(p.numel() for p in model.parameters()),
            "whole": sum(p.numel() for p in model.parameters() if id(p) not in inside),
            "largest_unit": max(sum(p.numel() for p in unit.parameters()) for unit in units)}


def per_rank_bytes(c: dict[str, int], ranks: int, sharded: bool, gather_bytes: int = 2) -> float:
    """Weights + gradients + LAMB state per rank (module docstring); `gather_bytes` 2 for bf16 gathers."""
    if not sharded:
        return 16.0 * c["params"]
    gathered = c["largest_unit"] * (2 * gather_bytes + 4)
    return 16.0 * (c["params"] - c["whole"]) / ranks + 16.0 * c["whole"] + gathered


def table() -> str:
    rows = ["| preset | parameters | DDP | FSDP, 8 ranks | FSDP, 64 ranks |", "|---|---|---|---|---|"]
    for short, preset in PRESETS.items():
        c = counts(preset)
        cells = [per_rank_bytes(c, 1, False), per_rank_bytes(c, 8, True), per_rank_bytes(c, 64, True)]
        rows.append(f"| {short} ({preset}) | {c['params'] / 1e9:.3f} B | "
                    + " | ".join(f"{b / GiB:.2f} GiB" for b in cells) + " |")
    return "\n".join(rows)


# ----- the measured CPU peak -----
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure_worker(rank: int, ranks: int, port: int, preset: str, out: str) -> None:
    import ctypes

    from pe_lightning.sharding import average_replicated_grads, shard_module
    from pe_lightning.stages.losses import clip_loss
    from pe_lightning.stages.optim import build_optimizer, param_groups

    torch.set_num_threads(1)
    if ranks > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=ranks)
    before = _rss_kib("VmRSS")
    torch.manual_seed(0)
    model = build_model(preset)
    whole = []
    if ranks > 1:
        from torch.distributed.device_mesh import init_device_mesh

        whole = shard_module(model, init_device_mesh("cpu", (ranks,)))
    opt = build_optimizer(param_groups(model, 0.05), "lamb", 2e-3, 0.05, grad_clip=1.0, compile=False)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what the whole weights built before sharding left
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the steps alone
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(1, 49406, (2, model.context_length))
    tokens[:, -1] = 49407
    for _ in range(3):
        opt.zero_grad()
        loss = clip_loss(model.visual(images), model.encode_text(tokens), model.logit_scale)
        loss.backward()
        if whole:
            average_replicated_grads(whole, None)
        opt.step()
    peak = _rss_kib("VmHWM") - before
    if rank == 0:
        Path(out).write_text(str(peak * 1024))
    if ranks > 1:
        torch.distributed.destroy_process_group()


def measure(preset: str, ranks: int) -> float:
    """Peak bytes per rank over three training steps on CPU (module docstring)."""
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # glibc keeps freed blocks below a threshold it raises as big tensors come and go, so the whole weights each
    # rank builds before sharding would stay resident; a fixed threshold maps every tensor's memory on its own,
    # returned when freed, and resident memory follows the live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peak")
        torch.multiprocessing.spawn(_measure_worker, args=(ranks, port, preset, out), nprocs=ranks)
        return float(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", default="", help="presets to measure on CPU, e.g. T,S")
    args = parser.parse_args()
    print(table())
    if args.measure:
        print("\n| preset | ranks | computed state per rank | measured CPU peak per rank |\n|---|---|---|---|")
        for short in args.measure.split(","):
            c = counts(PRESETS[short])
            for ranks in (1, 2):
                state = per_rank_bytes(c, ranks, ranks > 1, gather_bytes=4)
                print(f"| {short} | {ranks} ({'DDP' if ranks == 1 else 'FSDP'}) | {state / GiB:.2f} GiB | "
                      f"{measure(PRESETS[short], ranks) / GiB:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
