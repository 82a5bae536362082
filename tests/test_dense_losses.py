"""The spatial stage's losses (pe_lightning/stages/dense_losses.py) against hand-computed values."""

import math

import pytest
import torch

from pe_lightning.stages.dense_losses import gram_mse_loss, pairwise_similarity, self_distill_loss, token_selection


def _tok(*rows):
    return torch.tensor([rows], dtype=torch.float32)  # [1, N, D]


# ---------------------------------------------------------------------------------------------- self-distillation

def test_self_distill_sign_identical_orthogonal_opposite():
    x = torch.randn(2, 5, 8)
    assert self_distill_loss(x, x).item() == pytest.approx(-1.0, abs=1e-6)
    assert self_distill_loss(x, 3.0 * x).item() == pytest.approx(-1.0, abs=1e-6)  # scale-free
    assert self_distill_loss(x, -x).item() == pytest.approx(1.0, abs=1e-6)
    a, b = _tok([1.0, 0.0], [0.0, 2.0]), _tok([0.0, 5.0], [-3.0, 0.0])
    assert self_distill_loss(a, b).item() == pytest.approx(0.0, abs=1e-7)


def test_self_distill_hand_computed_and_selection():
    s = _tok([1.0, 0.0], [1.0, 0.0], [1.0, 0.0])
    t = _tok([1.0, 0.0], [1.0, 1.0], [0.0, 1.0])  # cosines 1, 1/sqrt2, 0
    assert self_distill_loss(s, t).item() == pytest.approx(-(1 + 1 / math.sqrt(2)) / 3, abs=1e-6)
    # only the selected tokens count, each once, normalised by their number
    w = torch.tensor([[True, False, True]])
    assert self_distill_loss(s, t, w).item() == pytest.approx(-0.5, abs=1e-6)
    # normalisation over the whole batch: image 0 has 1 selected token (cos 1), image 1 has 3 (cos 0)
    s2, t2 = torch.cat([s, s]), torch.cat([t, _tok([0.0, 1.0], [0.0, 1.0], [0.0, 1.0])])
    w2 = torch.tensor([[True, False, False], [True, True, True]])
    assert self_distill_loss(s2, t2, w2).item() == pytest.approx(-1 / 4, abs=1e-6)
    # nothing selected -> 0, graph kept
    s3 = s.clone().requires_grad_(True)
    loss = self_distill_loss(s3, t, torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad


def test_self_distill_gradient_only_to_student_and_descends():
    torch.manual_seed(0)
    s = torch.randn(2, 6, 4, requires_grad=True)
    t = torch.randn(2, 6, 4, requires_grad=True)
    self_distill_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    opt = torch.optim.Adam([s], lr=0.1)
    first = self_distill_loss(s, t).item()
    for _ in range(100):
        opt.zero_grad()
        self_distill_loss(s, t).backward()
        opt.step()
    assert self_distill_loss(s, t).item() < min(first, -0.95)


def test_self_distill_shape_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        self_distill_loss(torch.zeros(1, 4, 8), torch.zeros(1, 4, 6))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        self_distill_loss(torch.zeros(4, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="token selection"):
        self_distill_loss(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), torch.ones(1, 3))


def test_token_selection_policies():
    m = torch.tensor([[True, False, True]])
    assert token_selection(m, "masked").tolist() == [[True, False, True]]
    assert token_selection(m, "visible").tolist() == [[False, True, False]]
    assert token_selection(m, "all").tolist() == [[True, True, True]]
    assert token_selection(None, "visible", shape=(1, 2)).tolist() == [[True, True]]
    with pytest.raises(ValueError, match="visible"):
        token_selection(m, "some")


# ---------------------------------------------------------------------------------------------- similarity

def test_pairwise_similarity_hand_computed():
    s = pairwise_similarity(_tok([1.0, 0.0], [0.0, 2.0], [1.0, 1.0]))
    r = 1 / math.sqrt(2)
    want = torch.tensor([[[1.0, 0.0, r], [0.0, 1.0, r], [r, r, 1.0]]])
    assert s.shape == (1, 3, 3) and s.dtype == torch.float32
    torch.testing.assert_close(s, want)
    # half precision in, fp32 out; symmetric with unit diagonal
    x = torch.randn(2, 7, 5).half()
    s = pairwise_similarity(x)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, s.transpose(1, 2))
    torch.testing.assert_close(torch.diagonal(s, dim1=1, dim2=2), torch.ones(2, 7), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------- gram MSE

def _reference_gram_mse(s_tok, t_tok, sel):
    """Loop-by-loop reference: mean over images of the MSE over selected pairs (diagonal included)."""
    per = []
    for b in range(s_tok.shape[0]):
        idx = [i for i in range(s_tok.shape[1]) if sel[b, i]]
        if not idx:
            continue
        acc = 0.0
        for i in idx:
            for j in idx:
                cs = torch.nn.functional.cosine_similarity(s_tok[b, i], s_tok[b, j], dim=0).item()
                ct = torch.nn.functional.cosine_similarity(t_tok[b, i], t_tok[b, j], dim=0).item()
                acc += (cs - ct) ** 2
        per.append(acc / len(idx) ** 2)
    return sum(per) / len(per)


def test_gram_mse_zero_for_identical_similarity_any_channels():
    torch.manual_seed(0)
    s = torch.randn(2, 6, 4)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    target = torch.cat([s, torch.zeros(2, 6, 12)], -1) @ q * 7.0  # rotated, padded, rescaled: same cosines
    assert gram_mse_loss(s, target).item() == pytest.approx(0.0, abs=1e-10)


def test_gram_mse_toy_values():
    # S = identity, T = all ones: the two off-diagonal entries differ by 1 -> 2 / 4
    assert gram_mse_loss(_tok([1.0, 0.0], [0.0, 1.0]), _tok([1.0, 0.0], [1.0, 0.0])).item() == pytest.approx(0.5)
    # opposite student tokens vs orthogonal target: S_01 = -1, T_01 = 0
    s, t = _tok([1.0, 0.0], [-1.0, 0.0]), _tok([1.0, 0.0], [0.0, 1.0])
    assert gram_mse_loss(s, t).item() == pytest.approx(0.5)
    assert gram_mse_loss(s, t, remove_negative=True).item() == pytest.approx(0.0)  # negatives clipped at 0
    # the mean runs over images: 0.5 and 0
    both_s = torch.cat([_tok([1.0, 0.0], [0.0, 1.0]), _tok([1.0, 0.0], [0.0, 1.0])])
    both_t = torch.cat([_tok([1.0, 0.0], [1.0, 0.0]), _tok([1.0, 0.0], [0.0, 1.0])])
    assert gram_mse_loss(both_s, both_t).item() == pytest.approx(0.25)


def test_gram_mse_token_selection_and_reference():
    s = _tok([1.0, 0.0], [0.0, 1.0], [1.0, 0.0])
    t = _tok([1.0, 0.0], [0.0, 1.0], [0.0, 1.0])  # differs only in token 2
    assert gram_mse_loss(s, t, tokens=torch.tensor([[True, True, False]])).item() == pytest.approx(0.0)
    assert gram_mse_loss(s, t).item() > 0
    torch.manual_seed(1)
    s, t = torch.randn(3, 5, 4), torch.randn(3, 5, 9)
    sel = torch.rand(3, 5) > 0.4
    sel[2] = False  # an image without selected tokens is left out of the mean
    sel[0, 0] = True
    assert gram_mse_loss(s, t, tokens=sel).item() == pytest.approx(_reference_gram_mse(s, t, sel), abs=1e-6)


def test_gram_mse_accepts_grid_targets_and_checks_shapes():
    torch.manual_seed(2)
    s, t = torch.randn(2, 6, 4), torch.randn(2, 6, 5)
    grid = t.transpose(1, 2).reshape(2, 5, 2, 3)  # [B, C, h, w], row-major tokens
    assert gram_mse_loss(s, grid).item() == pytest.approx(gram_mse_loss(s, t).item(), abs=1e-7)
    with pytest.raises(ValueError, match="token grid"):
        gram_mse_loss(s, torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="cover"):
        gram_mse_loss(s, torch.randn(2, 5, 4))


def test_gram_mse_gradient_only_to_student_and_descends():
    torch.manual_seed(3)
    s = torch.randn(1, 8, 6, requires_grad=True)
    t = torch.randn(1, 8, 32, requires_grad=True)
    gram_mse_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    opt = torch.optim.Adam([s], lr=0.1)
    first = gram_mse_loss(s, t).item()
    for _ in range(60):
        opt.zero_grad()
        gram_mse_loss(s, t).backward()
        opt.step()
    assert gram_mse_loss(s, t).item() < 0.2 * first


def test_gram_mse_remove_negative_clamps_target_and_student_as_dinov3():
    # target negative, student orthogonal: only the target is clamped -> 0
    s, t = _tok([1.0, 0.0], [0.0, 1.0]), _tok([1.0, 0.0], [-1.0, 0.0])
    assert gram_mse_loss(s, t).item() == pytest.approx(0.5)
    assert gram_mse_loss(s, t, remove_negative=True).item() == pytest.approx(0.0)
    # both negative at different values: both clamped to 0 -> 0; positive pairs still count
    s, t = _tok([1.0, 0.0], [-0.6, 0.8]), _tok([1.0, 0.0], [-1.0, 0.0])
    assert gram_mse_loss(s, t, remove_negative=True).item() == pytest.approx(0.0)
    s, t = _tok([1.0, 0.0], [0.6, 0.8]), _tok([1.0, 0.0], [1.0, 0.0])
    assert gram_mse_loss(s, t, remove_negative=True).item() == pytest.approx(2 * 0.4 ** 2 / 4)


def test_gram_mse_centre_tokens_subtracts_each_images_mean_token():
    from pe_lightning.stages.dense_losses import centre_tokens

    torch.manual_seed(4)
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 7)
    shift_s, shift_t = torch.randn(2, 1, 4) * 50, torch.randn(2, 1, 7) * 50  # a large component every token shares
    # centred, a per-image shared offset does not matter; uncentred it dominates the cosines
    centred = gram_mse_loss(s + shift_s, t + shift_t, centre=True)
    assert centred.item() == pytest.approx(gram_mse_loss(s, t, centre=True).item(), abs=1e-5)
    assert gram_mse_loss(s + shift_s, t + shift_t).item() == pytest.approx(0.0, abs=0.05)
    assert centred.item() > 0.1
    sel = torch.ones(2, 5, dtype=torch.bool)
    c_s, c_t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    assert centred.item() == pytest.approx(_reference_gram_mse(c_s, c_t, sel), abs=1e-5)
    torch.testing.assert_close(centre_tokens(s).mean(1), torch.zeros(2, 4), atol=1e-6, rtol=0)
