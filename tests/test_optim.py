"""Weight-decay groups, optimizer construction and the samples-seen warmup-cosine schedule."""

import math

import pytest
import torch
from torch import nn

from pe_lightning.stages.optim import (
    WarmupCosine,
    build_optimizer,
    no_weight_decay,
    param_groups,
    set_lr,
)


class _Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.ln_1 = nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, 2)  # in_proj_weight, in_proj_bias, out_proj.{weight,bias}
        self.ls_1 = nn.Module()
        self.ls_1.gamma = nn.Parameter(torch.full((w,), 0.1))


class _Pool(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, w))
        self.mlp = nn.Linear(w, w)


class _Visual(nn.Module):
    def __init__(self, w=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 2, 2, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(5, w))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.block = _Block(w)
        self.attn_pool = _Pool(w)
        self.proj = nn.Parameter(torch.zeros(w, 4))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


class _Clip(nn.Module):
    def __init__(self, w=8):
        super().__init__()
        self.visual = _Visual(w)
        self.token_embedding = nn.Embedding(10, w)
        self.positional_embedding = nn.Parameter(torch.zeros(4, w))
        self.text_projection = nn.Parameter(torch.zeros(w, 4))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


EXPECTED_NO_DECAY = {
    "visual.class_embedding", "visual.positional_embedding", "visual.mask_token",
    "visual.ln_pre.weight", "visual.ln_pre.bias",
    "visual.block.ln_1.weight", "visual.block.ln_1.bias",
    "visual.block.attn.in_proj_bias", "visual.block.attn.out_proj.bias", "visual.block.ls_1.gamma",
    "visual.attn_pool.probe", "visual.attn_pool.mlp.bias",
    "token_embedding.weight", "positional_embedding", "logit_scale",
}
EXPECTED_DECAY = {
    "visual.conv1.weight", "visual.block.attn.in_proj_weight", "visual.block.attn.out_proj.weight",
    "visual.attn_pool.mlp.weight", "visual.proj", "text_projection",
}


def test_param_groups_split():
    model = _Clip()
    groups = param_groups(model, weight_decay=0.05)
    by_name = {g["group_name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay"}
    assert set(by_name["no_decay"]["param_names"]) == EXPECTED_NO_DECAY
    assert set(by_name["decay"]["param_names"]) == EXPECTED_DECAY  # frozen parameter skipped
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0
    params = dict(model.named_parameters())
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(params[n]) for n in g["param_names"]]
    # extra names; whole-component matching
    assert no_weight_decay("visual.proj", params["visual.proj"], extra=("proj",))
    assert not no_weight_decay("visual.my_mask_token", torch.zeros(2, 2))
    assert not no_weight_decay("visual.proj", params["visual.proj"])


@pytest.mark.parametrize("name", ["lamb", "adamw", "AdamW"])
def test_build_optimizer_steps(name):
    model = _Clip()
    opt = build_optimizer(model, name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
    wd = {g["group_name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 for g in opt.param_groups)
    if name == "lamb":
        from timm.optim import Lamb

        assert isinstance(opt, Lamb)
    else:
        assert isinstance(opt, torch.optim.AdamW)
        assert opt.param_groups[0]["foreach"] is True  # CPU here: foreach, fused only on CUDA
    before = model.text_projection.detach().clone()
    model.text_projection.grad = torch.ones_like(model.text_projection)
    opt.step()
    assert not torch.equal(before, model.text_projection)
    # also accepts pre-built groups
    opt2 = build_optimizer(param_groups(model, 0.1), name, lr=1e-3, weight_decay=0.1)
    assert len(opt2.param_groups) == 2


def test_build_optimizer_unknown_name():
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgdd'.*lamb, adamw"):
        build_optimizer(_Clip(), "sgdd", lr=1e-3, weight_decay=0.1)


def test_warmup_cosine_values():
    s = WarmupCosine(base_lr=2e-3, warmup_samples=1000, total_samples=11000, min_lr_ratio=0.1)
    assert s.lr_at(0) == 0.0
    assert s.lr_at(500) == pytest.approx(1e-3)
    assert s.lr_at(1000) == pytest.approx(2e-3)
    assert s.lr_at(6000) == pytest.approx((2e-3 + 2e-4) / 2)  # cosine midpoint
    assert s.lr_at(11000) == pytest.approx(2e-4)
    assert s.lr_at(50000) == pytest.approx(2e-4)
    assert s(3000) == s.lr_at(3000)
    lrs = [s.lr_at(x) for x in range(1000, 11001, 500)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # stateless: a fresh schedule at the same counter gives the same lr (exact resume)
    assert WarmupCosine(2e-3, 1000, 11000, 0.1).lr_at(7321) == s.lr_at(7321)
    # no warmup: starts at base
    assert WarmupCosine(1.0, 0, 10).lr_at(0) == 1.0
    assert WarmupCosine(1.0, 0, 10).lr_at(10) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_lr=1.0, warmup_samples=20, total_samples=10), "warmup_samples"),
    (dict(base_lr=1.0, warmup_samples=0, total_samples=0), "total_samples"),
    (dict(base_lr=1.0, warmup_samples=0, total_samples=10, min_lr_ratio=2.0), "min_lr_ratio"),
])
def test_warmup_cosine_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosine(**kwargs)


def test_set_lr_with_group_scale():
    model = _Clip()
    opt = build_optimizer(model, "adamw", lr=1.0, weight_decay=0.1)
    opt.param_groups[1]["lr_scale"] = 0.5
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]
    sched = WarmupCosine(base_lr=1e-3, warmup_samples=100, total_samples=1000)
    set_lr(opt, sched(50))
    assert sched(50) == pytest.approx(5e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(2.5e-4)
