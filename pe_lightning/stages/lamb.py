"""LAMB with a fused, compiled update per tensor and gradient-norm clipping inside the step.

The math is timm's `Lamb` at its defaults (NVIDIA FusedLAMB / NVLAMB): clip the gradient by its global
norm, Adam moments with bias correction, weight decay added to the update, and a layer-wise trust ratio
||w|| / ||update|| for the decayed group (the no-decay group takes plain Adam steps, timm's
`always_adapt=False`). The state layout is timm's too (`exp_avg`, `exp_avg_sq` per parameter, a CPU `step`
tensor per group), so checkpoints move between the two.

Why not timm's class as is: its update is ~20 foreach kernels per group, each a full pass over the weights,
and clipping through Lightning adds two more: 15 ms of a 141 ms PE-Core-B step on an H200, where fused AdamW
takes 3.6 ms (bench/results/nvidia-h200-2026-11-28T2125.md). LAMB is memory-bound, so what matters is how
many times the weights are read and written. `lamb_tensor_update` is the whole update of one tensor; torch.compile
turns it into two fused kernels (moments + update + the two norms, then the apply): about ten passes instead
of ~25. It is compiled once with a dynamic size for all tensors (flattened to 1-D) -- one graph over every
tensor would fuse further but takes ~1 s of Inductor time per tensor to build (minutes for PE-Core-B). The
numbers that change every step (learning rate, bias corrections, clip factor) and the hyper-parameters are
device tensors, so no step, group or stage recompiles and none reads a value back to the host.
tests/test_lamb.py checks the steps against timm's `Lamb`.

Sharded parameters (FSDP2's DTensors, `trainer.strategy=fsdp`): each rank holds a slice of every weight, but the
trust ratio needs the norm of the whole weight and the clip the norm of the whole gradient. So the step works on
each rank's local slice in two compiled passes (`lamb_shard_moments`: clip, moments, and the slice's sums of
squares of weight and update; `lamb_shard_apply`: the update again from the new moments, scaled by the trust
ratio), with one all-reduce of the gradient's sum of squares before and one of all the weights' and updates'
sums of squares (one vector for the whole model) between them. Same math as one process, to float rounding
(tests/test_fsdp.py).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger("pe_lightning")

__all__ = ["FusedLamb", "lamb_tensor_update", "lamb_shard_moments", "lamb_shard_apply"]


def lamb_tensor_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scalars: Tensor,
                       clip: Tensor) -> None:
    """One LAMB step of one (1-D) tensor, in place; the gradient is divided by `clip` (>= 1).

    scalars = (lr, 1 - beta1^t, 1 - beta2^t, beta1, beta2, eps, weight_decay, adapt): every hyper-parameter is a
    tensor,
    not a Python constant, so one compiled graph serves every group of every optimizer in the process. With
    constants, each (betas, eps, weight decay) of each stage was a variant of its own; `make pipeline` runs all
    stages in one process, hit dynamo's recompile limit and fell back to eager mid-pipeline, which rounds
    differently from a stage resumed in a fresh process (found by tests/kill_soak.py). `adapt` 0 (a group
    without weight decay, unless always_adapt) takes plain Adam steps: its trust ratio is 1."""
    lr, bias_correction1, bias_correction2 = scalars[0], scalars[1], scalars[2]
    beta1, beta2, eps, weight_decay, adapt = scalars[3], scalars[4], scalars[5], scalars[6], scalars[7]
    grad = grad / clip
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1.0 - beta2))
    update = (exp_avg / bias_correction1) / ((exp_avg_sq / bias_correction2).sqrt() + eps)
    update = update + weight_decay * param
    w_norm, u_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
    ratio = torch.where((adapt > 0) & (w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
    param.add_(update * (-lr * ratio))


def _direction(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scalars: Tensor) -> Tensor:
    """The Adam direction with bias correction, plus weight decay: the step before the trust ratio."""
    bias_correction1, bias_correction2, eps, weight_decay = scalars[1], scalars[2], scalars[5], scalars[6]
    update = (exp_avg / bias_correction1) / ((exp_avg_sq / bias_correction2).sqrt() + eps)
    return update + weight_decay * param


def lamb_shard_moments(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scalars: Tensor,
                       clip: Tensor, sums: Tensor) -> None:
    """First pass over one rank's slice of a weight: the clipped gradient into the moments, in place, and the
    slice's sums of squares of the weight and of the update into `sums` (2 values, summed over ranks next)."""
    beta1, beta2 = scalars[3], scalars[4]
    grad = grad / clip
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1.0 - beta2))
    update = _direction(param, exp_avg, exp_avg_sq, scalars)
    sums.copy_(torch.stack(((param * param).sum(), (update * update).sum())))


def lamb_shard_apply(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scalars: Tensor, sums: Tensor) -> None:
    """Second pass: the update again from the new moments (reading them twice costs less memory than keeping
    the update), scaled by the whole weight's trust ratio from `sums` (now summed over the shard group)."""
    lr, adapt = scalars[0], scalars[7]
    w_norm, u_norm = sums[0].sqrt(), sums[1].sqrt()
    ratio = torch.where((adapt > 0) & (w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
    param.add_(_direction(param, exp_avg, exp_avg_sq, scalars) * (-lr * ratio))


def _local(tensor: Tensor) -> Tensor:
    """This rank's slice of a DTensor (FSDP2's sharded parameters, gradients and states), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shard_groups(param: Tensor) -> tuple:
    """The process groups over which `param` is sharded (its Shard dims of the device mesh): sums of squares
    are all-reduced over these. Replicated dims (HSDP's replicas) hold the same slice and are not summed."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return ()
    return tuple(param.device_mesh.get_group(dim) for dim, place in enumerate(placements) if place.is_shard())


def _sum_over_shards(rows: Tensor, shard_groups: list[tuple]) -> Tensor:
    """`rows[i]` summed over the shard groups of weight i: one all-reduce per distinct set of groups (one for a
    model sharded with one mesh), rows of whole (replicated) weights left as they are."""
    for groups in sorted(set(shard_groups), key=len):
        if not groups:
            continue
        index = torch.tensor([i for i, g in enumerate(shard_groups) if g == groups], device=rows.device)
        part = rows.index_select(0, index)
        for group in groups:
            torch.distributed.all_reduce(part, group=group)
        rows.index_copy_(0, index, part)
    return rows


def _flat(tensor: Tensor) -> Tensor:
    """The tensor's memory as a 1-D tensor that is not a view: one compiled graph serves every shape (only the
    length is dynamic). A `view(-1)` would do the same math, but dynamo guards on a view's base, so each rank of
    parameter (biases, matrices, the patch convolution) was a compiled variant of its own."""
    if not tensor.is_contiguous():
        raise RuntimeError(f"FusedLamb needs contiguous parameters, gradients and states; got strides "
                           f"{tensor.stride()} for shape {tuple(tensor.shape)}")
    return tensor.new_empty(0).set_(tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,))


class FusedLamb(torch.optim.Optimizer):
    """LAMB (timm / NVLAMB semantics) applying `lamb_tensor_update` to each parameter, compiled when
    `compile=True`.

    `max_grad_norm` clips inside the step, so the Trainer must not clip again (`gradient_clip_val=None`).
    `last_grad_norm` holds the global gradient norm of the last step as a device tensor, for logging without
    a host sync. All parameters must be on one device.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: Optional[float] = 1.0, compile: bool = False,
                 always_adapt: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"FusedLamb: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"FusedLamb: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.compile = compile
        self.always_adapt = always_adapt  # timm's name: the trust ratio for the no-decay group too
        self._update: Callable[..., None] = (
            torch.compile(lamb_tensor_update, fullgraph=True, dynamic=True) if compile else lamb_tensor_update)
        self._moments: Callable[..., None] = (
            torch.compile(lamb_shard_moments, fullgraph=True, dynamic=True) if compile else lamb_shard_moments)
        self._apply_shard: Callable[..., None] = (
            torch.compile(lamb_shard_apply, fullgraph=True, dynamic=True) if compile else lamb_shard_apply)
        self._scalars: list[Tensor] = []
        self.last_grad_norm: Optional[Tensor] = None

    def _state(self, param: Tensor) -> tuple[Tensor, Tensor]:
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["exp_avg"], state["exp_avg_sq"]

    def _set_scalars(self, groups: list[dict], device: torch.device) -> list[Tensor]:
        """Each group's (lr, bias corrections, betas, eps, weight decay, adapt) in a persistent device tensor of its own
        (rows of one matrix would differ in storage offset, and each offset would be a compiled variant). `fill_`
        with a Python number is a kernel argument, not a host-to-device copy, so the step never waits."""
        if len(self._scalars) != len(groups) or any(row.device != device for row in self._scalars):
            self._scalars = [torch.zeros(8, dtype=torch.float32, device=device) for _ in groups]
        for row, group in zip(self._scalars, groups):
            step = int(group["step"].item())  # a CPU tensor: no device sync
            beta1, beta2 = group["betas"]
            adapt = bool(group["weight_decay"]) or self.always_adapt
            values = (group["lr"], 1.0 - beta1 ** step, 1.0 - beta2 ** step, beta1, beta2, group["eps"],
                      group["weight_decay"], float(adapt))
            for column, value in enumerate(values):
                row[column].fill_(value)
        return self._scalars

    def _clip_factor(self, grads: list[Tensor], shard_groups: Optional[list[tuple]] = None) -> Tensor:
        """max(1, global grad norm / max_grad_norm), as timm's Lamb; the norm is kept for logging. Sharded: each
        rank's sum of squares, all-reduced over the weight's shard groups, is the whole gradient's (a weight that
        every rank holds whole, such as FSDP's ignored scalars, is counted once: its groups are empty)."""
        if shard_groups is None:
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        else:
            squares = torch.stack(torch._foreach_norm([_local(g) for g in grads])).square()
            grad_norm = _sum_over_shards(squares, shard_groups).sum().sqrt()
        self.last_grad_norm = grad_norm
        if not self.max_grad_norm:
            return torch.ones((), device=grad_norm.device)
        return (grad_norm / self.max_grad_norm).clamp(min=1.0)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group.setdefault("step", torch.tensor(0.0))
            group["step"] += 1  # counted for every group, as timm does, even one without gradients
        trained = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        trained = [(group, params) for group, params in trained if params]
        if not trained:
            return loss
        grads = [p.grad for _, params in trained for p in params]
        if any(grad.is_sparse for grad in grads):
            raise RuntimeError("FusedLamb does not support sparse gradients")
        sharded = any(_shard_groups(g) for g in grads)
        shard_groups = [_shard_groups(g) for g in grads] if sharded else None
        clip = self._clip_factor(grads, shard_groups)
        scalars = self._set_scalars([group for group, _ in trained], clip.device)
        if sharded:
            self._sharded_step(trained, scalars, clip, shard_groups)
            return loss
        for (group, params), group_scalars in zip(trained, scalars):
            for p in params:
                exp_avg, exp_avg_sq = self._state(p)
                self._apply(_flat(p), _flat(p.grad), _flat(exp_avg), _flat(exp_avg_sq), group_scalars, clip)
        return loss

    def _sharded_step(self, trained: list, scalars: list[Tensor], clip: Tensor, shard_groups: list[tuple]) -> None:
        """Moments and local sums of squares per slice; every weight's two sums all-reduced at once; then each
        slice's update with its whole weight's trust ratio. A rank whose slice of a weight is empty (uneven
        sharding) still joins the all-reduce with zeros, so every rank sums the same vector."""
        work = []
        for (group, params), group_scalars in zip(trained, scalars):
            for p in params:
                exp_avg, exp_avg_sq = self._state(p)
                work.append((group_scalars, *(_local(t) for t in (p, p.grad, exp_avg, exp_avg_sq))))
        # one small tensor per weight, not rows of one matrix: each storage offset would be a compiled variant
        sums = [torch.zeros(2, dtype=torch.float32, device=clip.device) for _ in work]
        for row, (group_scalars, param, grad, exp_avg, exp_avg_sq) in zip(sums, work):
            if param.numel():
                self._compiled("_moments", _flat(param), _flat(grad), _flat(exp_avg), _flat(exp_avg_sq),
                               group_scalars, clip, row)
        torch._foreach_copy_(sums, _sum_over_shards(torch.stack(sums), shard_groups).unbind(0))
        for row, (group_scalars, param, _, exp_avg, exp_avg_sq) in zip(sums, work):
            if param.numel():
                self._compiled("_apply_shard", _flat(param), _flat(exp_avg), _flat(exp_avg_sq), group_scalars, row)

    def _apply(self, *args: Any) -> None:
        try:
            self._update(*args)
        except Exception as err:  # compilation fails before the kernel runs: nothing was written yet
            if self._update is lamb_tensor_update:
                raise
            self._run_eagerly(err)
            self._update(*args)

    def _compiled(self, name: str, *args: Any) -> None:
        """A pass of the sharded step (`_moments` or `_apply_shard`), eager once a compilation failed."""
        try:
            getattr(self, name)(*args)
        except Exception as err:
            if getattr(self, name) in (lamb_shard_moments, lamb_shard_apply):
                raise
            self._run_eagerly(err)
            getattr(self, name)(*args)

    def _run_eagerly(self, err: Exception) -> None:
        log.warning("FusedLamb: torch.compile of the update failed (%s: %s); running it eagerly (same "
                    "math, slower). Install a C++ compiler, or set optim.compile=false to use timm's Lamb.",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        self._update, self._moments, self._apply_shard = lamb_tensor_update, lamb_shard_moments, lamb_shard_apply
