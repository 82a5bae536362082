"""CLIP distillation loss: hand-computed toys, its minimum, the temperature modes, the feature term and its
width check, and 2 gloo processes against one process on the concatenated batch."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from pe_lightning.config import RecipeError
from pe_lightning.errors import UserError
from pe_lightning.stages.distill_losses import (ClipDistillLoss, DistillWidthError, FeatureProjector,
                                                clip_distill_loss, feature_mse, soft_cross_entropy)
from pe_lightning.stages.losses import clip_loss


# ---------------------------------------------------------------- plain-Python references

def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _logits(a, b, scale):
    """scale * unit(a_i) . unit(b_j), as lists."""
    a, b = [_unit(r) for r in a], [_unit(r) for r in b]
    return [[scale * sum(x * y for x, y in zip(ra, rb)) for rb in b] for ra in a]


def _transpose(m):
    return [list(c) for c in zip(*m)]


def _soft_ce(student, teacher):
    """mean over rows of -sum p_teacher log q_student."""
    rows = [-sum(p * lq for p, lq in zip(_softmax(t), _log_softmax(s))) for s, t in zip(student, teacher)]
    return sum(rows) / len(rows)


def _distill_ref(s_img, s_txt, s_scale, t_img, t_txt, t_scale):
    s = _logits(s_img, s_txt, s_scale)
    t = _logits(t_img, t_txt, t_scale)
    return 0.5 * (_soft_ce(s, t) + _soft_ce(_transpose(s), _transpose(t)))


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


S_IMG = [[1.0, 0.0], [0.0, 1.0]]
S_TXT = [[1.0, 0.0], [0.6, 0.8]]
T_IMG = [[1.0, 0.0], [0.0, 1.0]]
T_TXT = [[0.8, 0.6], [0.0, 1.0]]


# ---------------------------------------------------------------- values

def test_distill_2x2_hand_computed_own_scales():
    # student logits (scale 2): per image [[2, 1.2], [0, 1.6]], per text its transpose;
    # teacher logits (its own scale 3): per image [[2.4, 0], [1.8, 3]]
    s_row = _log_softmax([2.0, 1.2]), _log_softmax([0.0, 1.6])
    t_row = _softmax([2.4, 0.0]), _softmax([1.8, 3.0])
    i2t = -(sum(p * q for p, q in zip(t_row[0], s_row[0])) + sum(p * q for p, q in zip(t_row[1], s_row[1]))) / 2
    s_col = _log_softmax([2.0, 0.0]), _log_softmax([1.2, 1.6])
    t_col = _softmax([2.4, 1.8]), _softmax([0.0, 3.0])
    t2i = -(sum(p * q for p, q in zip(t_col[0], s_col[0])) + sum(p * q for p, q in zip(t_col[1], s_col[1]))) / 2
    expected = (i2t + t2i) / 2
    assert expected == pytest.approx(_distill_ref(S_IMG, S_TXT, 2.0, T_IMG, T_TXT, 3.0), abs=1e-12)
    out = clip_distill_loss(_t(S_IMG), _t(S_TXT), _t(math.log(2.0)), _t(T_IMG), _t(T_TXT), _t(math.log(3.0)),
                            teacher_scale=None, contrastive_weight=0.0)
    assert out.distill.item() == pytest.approx(expected, abs=1e-10)
    assert out.total.item() == pytest.approx(expected, abs=1e-10)  # pure distillation: total = D
    assert out.teacher_scale.item() == pytest.approx(3.0)


def test_distill_3x3_different_widths_unnormalised_inputs():
    # student width 2, teacher width 3 (allowed for D: both similarity matrices are 3 x 3); inputs are not
    # unit vectors, the loss normalises them
    s_img = [[2.0, 1.0], [0.0, 3.0], [1.0, -1.0]]
    s_txt = [[1.0, 1.0], [-1.0, 2.0], [3.0, 0.5]]
    t_img = [[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [1.0, 1.0, -1.0]]
    t_txt = [[1.0, 0.5, 1.0], [0.2, 2.0, 0.1], [0.5, 0.5, -2.0]]
    expected = _distill_ref(s_img, s_txt, 5.0, t_img, t_txt, 4.0)
    out = clip_distill_loss(_t(s_img), _t(s_txt), _t(math.log(5.0)), _t(t_img), _t(t_txt), _t(math.log(4.0)),
                            contrastive_weight=0.0)
    assert out.distill.item() == pytest.approx(expected, abs=1e-10)


def test_fixed_teacher_scale_is_used_whatever_the_teacher_own_scale():
    expected = _distill_ref(S_IMG, S_TXT, 2.0, T_IMG, T_TXT, 100.0)
    for own in (math.log(1.0), math.log(7.0), math.log(100.0), 0.3):
        out = clip_distill_loss(_t(S_IMG), _t(S_TXT), _t(math.log(2.0)), _t(T_IMG), _t(T_TXT), _t(own),
                                teacher_scale=100.0, contrastive_weight=0.0)
        assert out.distill.item() == pytest.approx(expected, abs=1e-10)
        assert out.teacher_scale.item() == 100.0
    # and it is not the teacher-own-scale value (the check is not vacuous)
    own = clip_distill_loss(_t(S_IMG), _t(S_TXT), _t(math.log(2.0)), _t(T_IMG), _t(T_TXT), _t(math.log(7.0)),
                            contrastive_weight=0.0)
    assert abs(own.distill.item() - expected) > 1e-2
    # no logit scale needed at all in the fixed mode; a log-like value is refused
    clip_distill_loss(_t(S_IMG), _t(S_TXT), _t(0.0), _t(T_IMG), _t(T_TXT), None, teacher_scale=50.0)
    with pytest.raises(RecipeError, match="teacher_scale must be > 0"):
        clip_distill_loss(_t(S_IMG), _t(S_TXT), _t(0.0), _t(T_IMG), _t(T_TXT), None, teacher_scale=-1.0)
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        clip_distill_loss(_t(S_IMG), _t(S_TXT), _t(0.0), _t(T_IMG), _t(T_TXT), None, teacher_scale=None)


def test_student_equal_to_teacher_gives_the_teacher_entropy_the_minimum():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    scale = math.log(4.0)
    logits = 4.0 * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()

    def entropy(m):
        p = m.softmax(-1)
        return -(p * p.log()).sum(-1).mean()

    h = 0.5 * (entropy(logits) + entropy(logits.t()))
    s_img = img.clone().requires_grad_()
    out = clip_distill_loss(s_img, txt, _t(scale), img, txt, _t(scale), contrastive_weight=0.0)
    assert out.distill.item() == pytest.approx(h.item(), abs=1e-10)
    out.total.backward()
    assert s_img.grad.abs().max() < 1e-10  # a stationary point
    # any perturbation of the student raises the loss above the entropy
    for k in range(5):
        g = torch.Generator().manual_seed(100 + k)  # not 0: that would draw `img` itself
        moved = clip_distill_loss(img + 0.3 * torch.randn(img.shape, generator=g, dtype=torch.float64), txt,
                                  _t(scale), img, txt, _t(scale), contrastive_weight=0.0)
        assert moved.distill.item() > h.item() + 1e-6
    # soft_cross_entropy on its own: the same minimum
    assert soft_cross_entropy(logits, logits).item() == pytest.approx(entropy(logits).item(), abs=1e-12)


def test_weights_contrastive_term_equals_clip_loss_and_teacher_is_detached():
    torch.manual_seed(1)
    s_img = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    s_txt = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t_img = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t_txt = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    s_scale = torch.tensor(math.log(3.0), dtype=torch.float64, requires_grad=True)
    t_scale = torch.tensor(math.log(6.0), dtype=torch.float64, requires_grad=True)
    out = clip_distill_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale, distill_weight=0.7,
                            contrastive_weight=0.25, feature_weight=3.0)
    assert out.contrastive.item() == pytest.approx(clip_loss(s_img, s_txt, s_scale).item(), abs=1e-12)
    d = _distill_ref(s_img.tolist(), s_txt.tolist(), 3.0, t_img.tolist(), t_txt.tolist(), 6.0)
    assert out.distill.item() == pytest.approx(d, abs=1e-10)
    f = feature_mse(s_img, t_img)
    assert out.total.item() == pytest.approx(0.7 * d + 0.25 * out.contrastive.item() + 3.0 * f.item(), abs=1e-10)
    out.total.backward()
    assert t_img.grad is None and t_txt.grad is None and t_scale.grad is None
    assert s_img.grad.abs().sum() > 0 and s_scale.grad.abs() > 0
    # a zero weight leaves its term out (reported 0) and off the graph
    pure = clip_distill_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale, contrastive_weight=0.0)
    assert pure.contrastive.item() == 0.0 and pure.feature.item() == 0.0
    assert pure.total.item() == pytest.approx(d, abs=1e-10)
    with pytest.raises(RecipeError, match="contrastive_weight must be >= 0"):
        clip_distill_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale, contrastive_weight=-1.0)


def test_feature_term_hand_computed():
    # unit([3, 4]) = [0.6, 0.8]; teacher unit([2, 0]) = [1, 0]: ((0.6 - 1)^2 + 0.8^2) / 2 = 0.4
    s = torch.tensor([[3.0, 4.0]], requires_grad=True)
    assert feature_mse(s, torch.tensor([[2.0, 0.0]])).item() == pytest.approx(0.4, abs=1e-7)
    assert feature_mse(s, torch.tensor([[6.0, 8.0]])).item() == pytest.approx(0.0, abs=1e-7)
    # with a projector: the projection comes before the normalisation
    proj = FeatureProjector(2, 3)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        proj.proj.bias.zero_()
    # unit([3, 4, 0]) vs unit([0, 0, 5]): (0.36 + 0.64 + 1) / 3
    assert feature_mse(s, torch.tensor([[0.0, 0.0, 5.0]]), proj).item() == pytest.approx(2 / 3, abs=1e-7)


# ---------------------------------------------------------------- widths

def test_width_error_names_both_widths_and_projection_fixes_it():
    with pytest.raises(DistillWidthError, match=r"student's image embedding is 64 wide, the teacher's 128"):
        ClipDistillLoss(64, 128, feature_weight=1.0)
    assert issubclass(DistillWidthError, RecipeError) and issubclass(DistillWidthError, UserError)
    with pytest.raises(DistillWidthError, match="64.*128"):
        feature_mse(torch.randn(2, 64), torch.randn(2, 128))
    # the distillation term alone works across widths; so does the feature term with the projection
    ClipDistillLoss(64, 128, feature_weight=0.0)
    loss = ClipDistillLoss(64, 128, feature_weight=2000.0, feature_projection=True)
    assert isinstance(loss.projector, FeatureProjector)
    assert [p.shape for p in loss.parameters()] == [torch.Size([128, 64]), torch.Size([128])]
    s_img, s_txt = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64)
    out = loss(s_img, s_txt, torch.tensor(math.log(10.0)), torch.randn(4, 128), torch.randn(4, 128),
               torch.tensor(math.log(20.0)))
    out.total.backward()
    assert out.feature.item() > 0 and loss.projector.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- two gloo processes vs one process

B_LOCAL, D_IN, D_S, D_T, WORLD = 3, 5, 4, 6, 2
MODES = {"own_scale": dict(teacher_scale=None), "fixed_50": dict(teacher_scale=50.0)}


def _problem():
    g = torch.Generator().manual_seed(4321)
    n = WORLD * B_LOCAL
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x_img=r(n, D_IN), x_txt=r(n, D_IN), w_img=r(D_S, D_IN), w_txt=r(D_S, D_IN),
                t_img=r(n, D_T), t_txt=r(n, D_T), p_w=r(D_T, D_S), p_b=r(D_T))


def _run(pb, sl, mode):
    """Student = two linear maps of the inputs + a logit scale; projector for the feature term."""
    x_img, x_txt = pb["x_img"][sl], pb["x_txt"][sl]
    w_img, w_txt = [torch.nn.Parameter(pb[k].clone()) for k in ("w_img", "w_txt")]
    scale = torch.nn.Parameter(torch.tensor(math.log(8.0), dtype=torch.float64))
    loss_fn = ClipDistillLoss(D_S, D_T, distill_weight=1.0, contrastive_weight=0.5, feature_weight=2.0,
                              feature_projection=True, **MODES[mode]).double()
    with torch.no_grad():
        loss_fn.projector.proj.weight.copy_(pb["p_w"])
        loss_fn.projector.proj.bias.copy_(pb["p_b"])
    out = loss_fn(x_img @ w_img.t(), x_txt @ w_txt.t(), scale, pb["t_img"][sl], pb["t_txt"][sl],
                  torch.tensor(math.log(30.0), dtype=torch.float64))
    out.total.backward()
    grads = {"w_img": w_img.grad, "w_txt": w_txt.grad, "scale": scale.grad,
             "p_w": loss_fn.projector.proj.weight.grad, "p_b": loss_fn.projector.proj.bias.grad}
    return out.total.detach(), out.distill, grads


def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        pb = _problem()
        res = {}
        for mode in MODES:
            loss, distill, grads = _run(pb, slice(rank * B_LOCAL, (rank + 1) * B_LOCAL), mode)
            for g in grads.values():  # what DDP does to parameter gradients
                dist.all_reduce(g)
                g /= WORLD
            for v in (loss, distill):  # the logged value: the mean over ranks
                dist.all_reduce(v)
                v /= WORLD
            res[mode] = {"loss": loss, "distill": distill, "grads": grads}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    pb = _problem()
    for mode in MODES:
        loss1, distill1, g1 = _run(pb, slice(None), mode)
        # a local-only computation (no gather) would differ: the targets really use the global batch
        local = [_run(pb, slice(r * B_LOCAL, (r + 1) * B_LOCAL), mode)[1] for r in range(WORLD)]
        assert abs(sum(local) / WORLD - distill1) > 1e-3
        for rank in range(WORLD):
            res = torch.load(tmp_path / f"rank{rank}.pt")[mode]
            assert torch.allclose(res["loss"], loss1, atol=1e-9, rtol=0), mode
            assert torch.allclose(res["distill"], distill1, atol=1e-9, rtol=0), mode
            for name, g in g1.items():
                assert torch.allclose(res["grads"][name], g, atol=1e-9, rtol=0), (mode, name)
        assert all(g.abs().max() > 1e-3 for g in g1.values()), mode
