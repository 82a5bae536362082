"""FusedLamb: the same steps as timm's Lamb (the reference), compiled once, clipping inside, state compatible."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.optim import Lamb

from pe_lightning.stages.lamb import FusedLamb
from pe_lightning.stages.optim import build_optimizer, param_groups


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _train(model, opt, steps: int, lr0: float = 1e-2, loss_scale: float = 30.0) -> list[float]:
    """A few steps with a changing lr (the schedule) and gradients large enough that clipping acts."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr0 * (s + 1) / steps
        opt.zero_grad()
        loss = (model(x) ** 2).mean() * loss_scale
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_matches_timm_lamb_step_by_step(max_grad_norm):
    ref_model, ours_model = _net(), _net()
    ref = Lamb(param_groups(ref_model, 0.1), max_grad_norm=max_grad_norm, **HYPER)
    ours = FusedLamb(param_groups(ours_model, 0.1), max_grad_norm=max_grad_norm, **HYPER)
    before = [p.detach().clone() for p in ours_model.parameters()]
    _train(ref_model, ref, 6)
    _train(ours_model, ours, 6)
    for (name, a), b, b0 in zip(ref_model.named_parameters(), ours_model.parameters(), before):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"{name} differs from timm's Lamb")
        assert not torch.equal(b, b0), f"{name} did not move"
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):  # the state too, under timm's names
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][key], ref.state[q][key], rtol=1e-4, atol=1e-8)
    assert [int(g["step"]) for g in ours.param_groups] == [int(g["step"]) for g in ref.param_groups] == [6, 6]


def test_always_adapt_matches_timm():
    """`always_adapt` (recipe optim.lamb_always_adapt): the no-decay group takes the trust ratio too, as timm's."""
    ref_model, ours_model = _net(), _net()
    ref = Lamb(param_groups(ref_model, 0.1), always_adapt=True, **HYPER)
    ours = FusedLamb(param_groups(ours_model, 0.1), always_adapt=True, **HYPER)
    plain_model = _net()
    plain = FusedLamb(param_groups(plain_model, 0.1), **HYPER)
    for model, opt in ((ref_model, ref), (ours_model, ours), (plain_model, plain)):
        _train(model, opt, 4)
    for a, b in zip(ref_model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    no_decay = [(p, q) for p, q in zip(plain.param_groups[1]["params"], ours.param_groups[1]["params"])]
    assert not any(torch.allclose(p, q) for p, q in no_decay)  # the option changed every no-decay step


def test_clipping_happens_inside_and_grad_norm_is_reported():
    model = _net()
    opt = FusedLamb(param_groups(model, 0.1), max_grad_norm=1e-3, **HYPER)
    x = torch.randn(4, 8)
    (model(x) ** 2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    opt.step()
    torch.testing.assert_close(opt.last_grad_norm, expected)
    assert expected > 1e-3  # so clipping acted ...
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # ... without touching .grad


def test_no_decay_group_takes_plain_adam_steps():
    """weight_decay 0 -> no trust ratio (timm's always_adapt=False): the first step moves each weight by lr."""
    p = torch.nn.Parameter(torch.full((3,), 5.0))
    opt = FusedLamb([p], lr=0.1, weight_decay=0.0, max_grad_norm=None)
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([4.9, 5.1, 4.9]), rtol=0, atol=1e-5)


def test_compiled_once_and_equal_to_eager():
    """One graph serves every tensor shape, both kinds of group (decayed with trust ratio, plain Adam) and every
    step: lr and bias corrections change each step without a recompile (device tensors, not Python floats)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_model, compiled_model = _net(), _net()
    eager = FusedLamb(param_groups(eager_model, 0.1), max_grad_norm=1.0, **HYPER)
    compiled = FusedLamb(param_groups(compiled_model, 0.1), max_grad_norm=1.0, compile=True, **HYPER)
    for steps in (1, 4):  # _train's lr schedule depends on its step count: same calls on both
        _train(eager_model, eager, steps)
    _train(compiled_model, compiled, 1)
    graphs_after_first_step = counters["stats"]["unique_graphs"]
    _train(compiled_model, compiled, 4)
    assert graphs_after_first_step == counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_other_hyper_parameters_reuse_the_compiled_graph():
    """Every stage of `make pipeline` builds its own optimizer in one process, with its own betas, eps and weight
    decay: none may add a compiled variant (with Python constants they did, hit dynamo's recompile limit and fell
    back to eager mid-pipeline, rounding differently from a stage resumed in a fresh process)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    settings = [dict(betas=(0.9, b2), eps=eps, weight_decay=wd) for b2 in (0.95, 0.99, 0.999)
                for eps in (1e-6, 1e-8) for wd in (0.05, 0.1)]
    for hyper in settings:  # 12 optimizers: more than dynamo's default recompile limit of 8
        model = _net()
        compiled = FusedLamb(param_groups(model, hyper["weight_decay"]), lr=1e-2, compile=True, **hyper)
        _train(model, compiled, 2)
        reference = _net()
        _train(reference, Lamb(param_groups(reference, hyper["weight_decay"]), lr=1e-2, **hyper), 2)
        for a, b in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"{hyper}: differs from timm's Lamb")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_state_dict_round_trip_resumes_exactly():
    a = _net()
    opt_a = FusedLamb(param_groups(a, 0.1), **HYPER)
    _train(a, opt_a, 3)
    b = copy.deepcopy(a)
    opt_b = FusedLamb(param_groups(b, 0.1), **HYPER)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _train(a, opt_a, 3)
    _train(b, opt_b, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_timm_state_loads_into_fused_lamb():
    """Checkpoints move between the CPU path (timm) and the GPU path (ours)."""
    a, b = _net(), _net()
    ref = Lamb(param_groups(a, 0.1), max_grad_norm=1.0, **HYPER)
    _train(a, ref, 3)
    b.load_state_dict(a.state_dict())
    ours = FusedLamb(param_groups(b, 0.1), max_grad_norm=1.0, **HYPER)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    _train(a, ref, 2)
    _train(b, ours, 2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="max_grad_norm"):
        FusedLamb(_net().parameters(), max_grad_norm=0.0)
    with pytest.raises(ValueError, match="lr"):
        FusedLamb(_net().parameters(), lr=-1.0)


def test_build_optimizer_picks_the_path_and_the_trainer_clips_only_for_adamw():
    model = _net()
    assert isinstance(build_optimizer(model, "lamb", 1e-3, 0.1, grad_clip=1.0), Lamb)
    fused = build_optimizer(model, "lamb", 1e-3, 0.1, grad_clip=1.0, compile=True)
    assert isinstance(fused, FusedLamb) and fused.compile and fused.max_grad_norm == 1.0
    assert build_optimizer(model, "lamb", 1e-3, 0.1, grad_clip=0.0).defaults["max_grad_norm"] is None


def test_falls_back_to_eager_when_compilation_fails(caplog):
    """A machine without a C++ compiler still trains: the step runs eagerly, with a warning naming the fix."""
    from torch._dynamo.exc import BackendCompilerFailed

    ref_model, model = _net(), _net()
    ref = FusedLamb(param_groups(ref_model, 0.1), **HYPER)
    opt = FusedLamb(param_groups(model, 0.1), compile=True, **HYPER)

    def no_compiler(*args):
        raise BackendCompilerFailed(lambda *a: None, RuntimeError("no C++ compiler found"))

    opt._update = no_compiler
    with caplog.at_level("WARNING", logger="pe_lightning"):
        _train(ref_model, ref, 2)
        _train(model, opt, 2)
    assert "optim.compile=false" in caplog.text
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
