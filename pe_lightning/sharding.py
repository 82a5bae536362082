"""`trainer.strategy=fsdp`: FSDP2 (`fully_shard`, parameters as DTensors) through Lightning's ModelParallelStrategy.

Why FSDP2 and not Lightning's `FSDPStrategy` (FSDP1): FSDP1 flattens a wrapped unit's weights into one flat
buffer and shards that, so a rank's slice may hold the end of one weight and the start of the next; LAMB's
per-weight trust ratio would need the flat layout unpicked. FSDP2 shards every weight on its own (dim 0 as a
DTensor), so each rank holds a slice of each weight and `FusedLamb` sums squares per slice and all-reduces them
(stages/lamb.py). FSDP2 also runs on CPU with gloo (FSDP1's Lightning strategy asks for a GPU), keeps the
parameter names (exports and state dicts unchanged) and writes sharded checkpoints through
torch.distributed.checkpoint: one folder, each rank writing its own slice.

What is sharded (`_units`): every transformer block, the attention-pooling head and torch's layers outside them
(patch convolution, norms, token embedding), each gathered just before it runs and freed after. The towers'
own parameters (positional and class embeddings, projections, the CLIP scale: ~0.5% of PE-Core-G) are used by
tower methods that stages call directly, where FSDP's hooks cannot fire: every rank holds them whole and their
gradients are averaged over the ranks before the step (`average_replicated_grads`), as DDP would.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

__all__ = ["ShardedDataParallel", "build_strategy", "is_sharded", "shard_module", "mixed_precision_policy",
           "average_replicated_grads", "whole_state_dict"]


class ShardedDataParallel(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with every rank in one data-parallel shard group (no tensor parallelism),
    whatever the number of devices and nodes; sharded checkpoints (a folder with one file per rank + meta.pt)."""

    def __init__(self, **kwargs: Any):
        super().__init__(save_distributed_checkpoint=True, **kwargs)

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" puts the GPUs of a node in the tensor-parallel dimension
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def build_strategy(name: str) -> Any:
    """The Trainer's `strategy`: `fsdp` is ours (FSDP2, on CPU too); every other name goes to Lightning as is."""
    return ShardedDataParallel() if name == "fsdp" else name


def is_sharded(trainer: Any) -> bool:
    """True when the trainer's strategy shards parameters as DTensors (our `fsdp`, or any ModelParallelStrategy)."""
    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def mixed_precision_policy(precision: str) -> Optional[Any]:
    """bf16 runs gather weights in bf16 (half the traffic and the gathered memory) and reduce gradients in fp32;
    the sharded weights, gradients and LAMB state stay fp32. Other precisions: FSDP's default (no casts)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in ("bf16-mixed", "bf16-true"):
        # Inputs are not cast: autocast picks each op's dtype, and a block's RoPE angles stay fp32 (PE computes
        # RoPE in fp32; FSDP's default cast would hand the blocks bf16 cos/sin, which torch.complex refuses).
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return None


def _units(module: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards, each gathered only while it runs: the transformer blocks (`resblocks.*`), the
    attention-pooling head, and torch's own layers elsewhere (patch convolution, norms, token embedding,
    linears). Each is always called as a module, so its hooks fire; the towers are not (stages call their
    methods: `visual.forward_features`, `encode_text`), so their own parameters cannot be in a unit."""
    units: list[nn.Module] = []
    for name, child in module.named_children():
        if name == "resblocks":
            units.extend(child)
        elif name == "attn_pool" or (type(child).__module__.startswith("torch.nn.modules")
                                     and any(True for _ in child.parameters(recurse=False))):
            units.append(child)
        else:
            units.extend(_units(child))
    return units


def shard_module(module: nn.Module, mesh: Any, policy: Optional[Any] = None) -> list[nn.Parameter]:
    """fully_shard every unit of `module` (`_units`); returns the parameters left whole on every rank: the
    towers' own (positional and class embeddings, mask token, projections, the CLIP scale; ~0.5% of PE-Core-G)."""
    from torch.distributed.fsdp import fully_shard

    # The pooling head returns a view (its one query's row); nothing writes to it in place, as FSDP warns against.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPAttentionPooling\) returned a view")
    options = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
    for unit in _units(module):
        fully_shard(unit, **options)
    return [p for p in module.parameters() if not hasattr(p, "placements")]


def average_replicated_grads(params: Iterable[nn.Parameter], group: Any) -> None:
    """Average the gradients of the whole-on-every-rank parameters over `group` (one all-reduce), as DDP does;
    FSDP reduce-scatters every other gradient itself."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=group)  # SUM: gloo has no AVG
    flat /= torch.distributed.get_world_size(group)
    for grad, value in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(value.view_as(grad))


def whole_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded module, on CPU, on global rank 0 (empty elsewhere). A
    collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
