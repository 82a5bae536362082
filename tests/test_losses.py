"""Losses: CLIP loss by hand, across 2 gloo processes vs one process, mask and distillation losses."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from pe_lightning.stages.losses import (
    clamp_logit_scale,
    clip_loss,
    gather_with_grad,
    mask_feature_loss,
    soft_clip_distill_loss,
)


def _lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_clip_loss_hand_computed_2x2():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * img @ txt.T = [[2, 1.2], [0, 1.6]]
    i2t = ((-2 + _lse(2, 1.2)) + (-1.6 + _lse(0, 1.6))) / 2
    t2i = ((-2 + _lse(2, 0)) + (-1.6 + _lse(1.2, 1.6))) / 2
    expected = (i2t + t2i) / 2
    loss = clip_loss(img, txt, torch.tensor(math.log(2.0)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # features are normalised inside: scaling rows changes nothing
    scaled = clip_loss(img * torch.tensor([[3.0], [0.5]]), txt * 7.0, torch.tensor(math.log(2.0)))
    assert scaled.item() == pytest.approx(expected, abs=1e-6)
    # ... unless asked not to
    raw = clip_loss(img * 3.0, txt, torch.tensor(math.log(2.0)), normalize=False)
    assert raw.item() != pytest.approx(expected, abs=1e-3)
    # a float log-scale works too
    assert clip_loss(img, txt, math.log(2.0)).item() == pytest.approx(expected, abs=1e-6)


def test_clip_loss_hand_computed_3x3_asymmetric():
    img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # text 0 looks like image 1
    s = 10.0
    # logits = s * img @ txt.T = s * txt.T (img is the identity): L[i][j] = s * txt[j][i]
    L = [[s * txt[j][i].item() for j in range(3)] for i in range(3)]
    i2t = sum(-L[i][i] + _lse(*L[i]) for i in range(3)) / 3
    t2i = sum(-L[j][j] + _lse(*[L[i][j] for i in range(3)]) for j in range(3)) / 3
    loss = clip_loss(img, txt, torch.tensor(math.log(s)))
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)


def test_clip_loss_bf16_inputs_computed_in_fp32_and_shape_check():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    ref = clip_loss(a, b, torch.tensor(2.0))
    half = clip_loss(a.bfloat16(), b.bfloat16(), torch.tensor(2.0))
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(ref.item(), rel=2e-2)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(a, b[:3], torch.tensor(2.0))


def test_gather_with_grad_is_identity_when_not_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_clamp_logit_scale():
    p = torch.nn.Parameter(torch.tensor(math.log(500.0)))
    clamp_logit_scale(p, max_scale=100)
    assert p.item() == pytest.approx(math.log(100.0))
    assert p.requires_grad and p.grad is None
    q = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    clamp_logit_scale(q)
    assert q.item() == pytest.approx(math.log(1 / 0.07))  # in range: untouched
    r = torch.nn.Parameter(torch.tensor(-3.0))
    clamp_logit_scale(r, min_scale=1.0)
    assert r.item() == 0.0


# ---------------------------------------------------------------- two gloo processes vs one process

B_LOCAL, D_IN, D_OUT, WORLD = 3, 5, 4, 2


def _problem():
    """Deterministic inputs, two projections and a log-temperature, in float64."""
    g = torch.Generator().manual_seed(1234)
    x_img = torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=torch.float64)
    w_img = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    w_txt = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    return x_img, x_txt, w_img, w_txt, torch.tensor(math.log(5.0), dtype=torch.float64)


def _run(x_img, x_txt, w_img, w_txt, scale):
    x_img, x_txt = x_img.clone().requires_grad_(), x_txt.clone().requires_grad_()
    proj_i = torch.nn.Linear(D_IN, D_OUT, bias=False, dtype=torch.float64)
    proj_t = torch.nn.Linear(D_IN, D_OUT, bias=False, dtype=torch.float64)
    with torch.no_grad():
        proj_i.weight.copy_(w_img)
        proj_t.weight.copy_(w_txt)
    logit_scale = torch.nn.Parameter(scale.clone())
    loss = clip_loss(proj_i(x_img), proj_t(x_txt), logit_scale)
    loss.backward()
    return loss.detach(), {
        "x_img": x_img.grad, "x_txt": x_txt.grad,
        "w_img": proj_i.weight.grad, "w_txt": proj_t.weight.grad, "logit_scale": logit_scale.grad,
    }


def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x_img, x_txt, w_img, w_txt, scale = _problem()
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        loss, grads = _run(x_img[sl], x_txt[sl], w_img, w_txt, scale)
        # what DDP does to parameter gradients: average over ranks; the logged loss is the mean too
        for name in ("w_img", "w_txt", "logit_scale"):
            dist.all_reduce(grads[name])
            grads[name] /= WORLD
        dist.all_reduce(loss)
        loss /= WORLD
        torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_clip_loss_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    loss1, g1 = _run(*_problem())
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(res["loss"], loss1, atol=1e-6, rtol=0)
        # parameters (both towers' projections and the temperature): DDP-averaged == single process
        for name in ("w_img", "w_txt", "logit_scale"):
            assert torch.allclose(res["grads"][name], g1[name], atol=1e-6, rtol=0), name
        # activations: a rank's input-feature gradient is WORLD x the single-process one for its rows
        # (DDP's 1/WORLD is applied to parameter gradients only)
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for name in ("x_img", "x_txt"):
            assert torch.allclose(res["grads"][name] / WORLD, g1[name][sl], atol=1e-6, rtol=0), name
    # the check is not vacuous: the gradients are far from zero
    assert g1["w_img"].abs().max() > 1e-2 and g1["x_txt"].abs().max() > 1e-2


# ---------------------------------------------------------------- mask regularisation

def test_mask_feature_loss_zero_identical_positive_otherwise():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 8)
    assert mask_feature_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    assert mask_feature_loss(t * 3.0, t).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    assert mask_feature_loss(t + torch.randn_like(t), t).item() > 0.01
    assert mask_feature_loss(-t, t).item() == pytest.approx(2.0, abs=1e-6)
    # orthogonal tokens: exactly 1
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert mask_feature_loss(a, b).item() == pytest.approx(1.0, abs=1e-6)


def test_mask_feature_loss_target_is_detached_and_masked_average():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], requires_grad=True)  # [1, 3 tokens, 2]
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]], requires_grad=True)
    # all tokens: (0 + 1 + 0) / 3
    loss = mask_feature_loss(x, t)
    assert loss.item() == pytest.approx(1 / 3, abs=1e-6)
    loss.backward()
    assert t.grad is None and x.grad is not None
    # masked positions only; mask covers the 2 patch tokens after a class token at index 0
    only_mismatch = torch.tensor([[True, False]])
    assert mask_feature_loss(x, t, only_mismatch).item() == pytest.approx(1.0, abs=1e-6)
    only_match = torch.tensor([[False, True]])
    assert mask_feature_loss(x, t, only_match).item() == pytest.approx(0.0, abs=1e-6)
    full = torch.tensor([[False, True, False]])  # mask as long as the tokens: no prefix
    assert mask_feature_loss(x, t, full).item() == pytest.approx(1.0, abs=1e-6)
    assert mask_feature_loss(x, t, torch.tensor([[False, False]])).item() == 0.0
    with pytest.raises(ValueError, match="does not fit"):
        mask_feature_loss(x, t, torch.tensor([[True] * 4]))


# ---------------------------------------------------------------- distillation

def test_soft_clip_distill_loss():
    s = torch.tensor([[2.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0]], requires_grad=True)
    assert soft_clip_distill_loss(s, s.detach().clone(), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    T = 2.0
    # p_t = softmax([0, 1]), p_s = softmax([1, 0]); KL = sum p_t (log p_t - log p_s), times T^2
    pt = [1 / (1 + math.e), math.e / (1 + math.e)]
    ps = [pt[1], pt[0]]
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    loss = soft_clip_distill_loss(s, t, T)
    assert loss.item() == pytest.approx(kl * T**2, abs=1e-6)
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    # gradient w.r.t. student logits = T * (p_s - p_t)
    assert torch.allclose(s.grad, T * (torch.tensor([ps]) - torch.tensor([pt])), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        soft_clip_distill_loss(s, t, 0.0)
