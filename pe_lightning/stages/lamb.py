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
numbers that change every step (learning rate, bias corrections, clip factor) are device tensors, so no step
recompiles and none reads a value back to the host. tests/test_lamb.py checks the steps against timm's `Lamb`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger("pe_lightning")

__all__ = ["FusedLamb", "lamb_tensor_update"]


def lamb_tensor_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scalars: Tensor,
                       clip: Tensor, weight_decay: float, beta1: float, beta2: float, eps: float) -> None:
    """One LAMB step of one (1-D) tensor, in place. scalars = (lr, 1 - beta1^t, 1 - beta2^t); the gradient is
    divided by `clip` (>= 1). Plain tensor code with static Python constants, so torch.compile takes it whole."""
    lr, bias_correction1, bias_correction2 = scalars[0], scalars[1], scalars[2]
    grad = grad / clip
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    update = (exp_avg / bias_correction1) / ((exp_avg_sq / bias_correction2).sqrt() + eps)
    if weight_decay:
        update = update + weight_decay * param
        w_norm, u_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
        param.add_(update * (-lr * ratio))
    else:
        param.add_(update * -lr)


class FusedLamb(torch.optim.Optimizer):
    """LAMB (timm / NVLAMB semantics) applying `lamb_tensor_update` to each parameter, compiled when
    `compile=True`.

    `max_grad_norm` clips inside the step, so the Trainer must not clip again (`gradient_clip_val=None`).
    `last_grad_norm` holds the global gradient norm of the last step as a device tensor, for logging without
    a host sync. All parameters must be on one device.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: Optional[float] = 1.0, compile: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"FusedLamb: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"FusedLamb: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.compile = compile
        self._update: Callable[..., None] = (
            torch.compile(lamb_tensor_update, fullgraph=True, dynamic=True) if compile else lamb_tensor_update)
        self._scalars: Optional[Tensor] = None
        self.last_grad_norm: Optional[Tensor] = None

    def _state(self, param: Tensor) -> tuple[Tensor, Tensor]:
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["exp_avg"], state["exp_avg_sq"]

    def _set_scalars(self, groups: list[dict], device: torch.device) -> Tensor:
        """Each group's (lr, bias corrections) in a persistent device tensor. `fill_` with a Python number is a
        kernel argument, not a host-to-device copy, so the step never waits for the device."""
        if self._scalars is None or self._scalars.shape[0] != len(groups) or self._scalars.device != device:
            self._scalars = torch.zeros(len(groups), 3, dtype=torch.float32, device=device)
        for row, group in zip(self._scalars, groups):
            step = int(group["step"].item())  # a CPU tensor: no device sync
            beta1, beta2 = group["betas"]
            for column, value in enumerate((group["lr"], 1.0 - beta1 ** step, 1.0 - beta2 ** step)):
                row[column].fill_(value)
        return self._scalars

    def _clip_factor(self, grads: list[Tensor]) -> Tensor:
        """max(1, global grad norm / max_grad_norm), as timm's Lamb; the norm is kept for logging."""
        self.last_grad_norm = grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
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
        clip = self._clip_factor(grads)
        scalars = self._set_scalars([group for group, _ in trained], clip.device)
        for (group, params), group_scalars in zip(trained, scalars):
            beta1, beta2 = group["betas"]
            weight_decay, eps = float(group["weight_decay"]), float(group["eps"])
            for p in params:
                exp_avg, exp_avg_sq = self._state(p)
                # 1-D views: one compiled graph serves every shape (only the length is dynamic)
                self._apply(p.view(-1), p.grad.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1), group_scalars,
                            clip, weight_decay, beta1, beta2, eps)
        return loss

    def _apply(self, *args: Any) -> None:
        try:
            self._update(*args)
        except Exception as err:  # compilation fails before the kernel runs: nothing was written yet
            if self._update is lamb_tensor_update:
                raise
            log.warning("FusedLamb: torch.compile of the update failed (%s: %s); running it eagerly (same "
                        "math, slower). Install a C++ compiler, or set optim.compile=false to use timm's Lamb.",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self._update = lamb_tensor_update
            self._update(*args)
