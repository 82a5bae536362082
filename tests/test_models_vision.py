"""Vision tower: presets, RoPE and posemb off the native grid against an independent reference written from
PE_REFERENCE.md, masking, intermediates, truncation, LayerScale / DropPath, conv stem."""

import math

import pytest
import torch
import torch.nn.functional as F

from pe_lightning.models import PRESETS, CLIPConfig, VisionConfig, build_model, get_preset
from pe_lightning.models.layers import LayerScale
from pe_lightning.models.vision import VisionTransformer
from timm.layers import DropPath


def small_vision(**kw) -> VisionTransformer:
    cfg = dict(image_size=64, patch_size=16, width=64, layers=2, heads=2, mlp_dim=128, use_cls_token=True,
               pool_type="attn", use_ln_post=True, output_dim=32)
    cfg.update(kw)
    torch.manual_seed(0)
    v = VisionTransformer(VisionConfig(**cfg)).eval()
    with torch.no_grad():  # make every parameter non-trivial (LN gains, biases, ...)
        for p in v.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return v


# --------------------------------------------------------------------------------------------------------
# presets

TABLE = {  # PE_REFERENCE.md section 4: img, patch, width, depth, heads, mlp, cls, pool, ln_post, ls, out
    "PE-Core-G14-448": (448, 14, 1536, 50, 16, 8960, False, "attn", True, None, 1280),
    "PE-Core-L14-336": (336, 14, 1024, 24, 16, 4096, True, "attn", True, None, 1024),
    "PE-Core-B16-224": (224, 16, 768, 12, 12, 3072, True, "attn", True, None, 1024),
    "PE-Core-S16-384": (384, 16, 384, 12, 6, 1536, True, "attn", True, None, 512),
    "PE-Core-T16-384": (384, 16, 192, 12, 3, 768, True, "attn", True, None, 512),
    "PE-Lang-G14-448": (448, 14, 1536, 47, 16, 8960, False, "none", False, 0.1, None),
    "PE-Lang-L14-448": (448, 14, 1024, 23, 16, 4096, True, "none", False, 0.1, None),
    "PE-Spatial-G14-448": (448, 14, 1536, 50, 16, 8960, False, "none", False, 0.1, None),
    "PE-Spatial-L14-448": (448, 14, 1024, 24, 16, 4096, True, "none", False, None, None),
    "PE-Spatial-B16-512": (512, 16, 768, 12, 12, 3072, True, "none", False, None, None),
    "PE-Spatial-S16-512": (512, 16, 384, 12, 6, 1536, True, "none", False, None, None),
    "PE-Spatial-T16-512": (512, 16, 192, 12, 3, 768, True, "none", False, None, None),
}
TEXT = {"G": (72, 1280, 24, 20), "L": (32, 1024, 24, 16), "B": (32, 1024, 24, 16), "S": (32, 512, 12, 8),
        "T": (32, 512, 12, 8)}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_released_presets_match_reference(name):
    cfg = get_preset(name)
    v = cfg.vision
    got = (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_dim, v.use_cls_token, v.pool_type,
           v.use_ln_post, v.ls_init_value, v.output_dim)
    assert got == TABLE[name]
    assert v.stem == "patch" and v.attn_pool_heads == 8 and v.use_rope and v.use_abs_posemb
    assert cfg.name == name
    if name.startswith("PE-Core"):
        t = cfg.text
        assert (t.context_length, t.width, t.layers, t.heads) == TEXT[name.split("-")[2][0]]
        assert t.mlp_dim == 4 * t.width and t.vocab_size == 49408 and t.pad_id == 0
        assert t.output_dim == v.output_dim
        assert cfg.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    else:  # Meta's Lang / Spatial files are vision-only
        assert cfg.text is None
    assert v.truncated_from == {"PE-Lang-G14-448": 50, "PE-Lang-L14-448": 24}.get(name)


def test_tiny_preset():
    cfg = get_preset("tiny")
    v, t = cfg.vision, cfg.text
    assert (v.image_size, v.patch_size, v.stem, v.width, v.layers, v.heads, v.mlp_dim) == (64, 8, "conv", 128, 4, 2, 512)
    assert v.use_cls_token and v.pool_type == "attn" and v.use_ln_post and v.output_dim == 128
    assert (t.context_length, t.width, t.layers, t.heads, t.output_dim) == (32, 128, 2, 2, 128)
    assert set(PRESETS) == set(TABLE) | {"tiny", "tiny-half", "tiny-deep"}
    half = get_preset("tiny-half")  # the distillation student: half the width, same grid and depth
    assert (half.vision.width, half.text.width, half.vision.layers, half.vision.output_dim) == (64, 64, 4, 64)


def test_get_preset_errors_and_overrides():
    with pytest.raises(ValueError) as e:
        get_preset("PE-Core-X99")
    assert "PE-Core-X99" in str(e.value) and "PE-Core-B16-224" in str(e.value) and "tiny" in str(e.value)
    with pytest.raises(ValueError, match="widht"):
        get_preset("tiny", vision={"widht": 128})
    with pytest.raises(ValueError, match="contxt"):
        get_preset("tiny", text={"contxt": 16})
    with pytest.raises(ValueError, match="bogus"):
        get_preset("tiny", bogus=1)
    cfg = get_preset("tiny", vision={"layers": 2}, text={"layers": 1}, drop_path=0.1)
    assert cfg.vision.layers == 2 and cfg.text.layers == 1 and cfg.vision.drop_path == 0.1
    assert get_preset("tiny").vision.layers == 4  # presets are not mutated
    assert get_preset("PE-Core-T16-384", text=None).text is None
    with pytest.raises(ValueError, match="output_dim"):
        get_preset("tiny", vision={"output_dim": 64})  # vision and text output dims must agree
    with pytest.raises(ValueError, match="pool_type"):
        get_preset("tiny", vision={"pool_type": "avg"})
    with pytest.raises(ValueError, match="patch_size=8"):
        get_preset("tiny", vision={"patch_size": 16})
    assert get_preset("PE-Spatial-T16-512", vision={}, text={}).text is None  # empty dicts change nothing
    assert get_preset("tiny", vision={}, text={}) == get_preset("tiny")
    with pytest.raises(ValueError, match="no text tower to override"):  # no grafting of a text tower
        get_preset("PE-Spatial-T16-512", text={"layers": 2})
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------------------------------------
# independent reference (PE_REFERENCE.md sections 1-2), float64, explicit loops

def ref_rope_angles(grid_h, grid_w, head_dim, cls):
    n = head_dim // 4
    freqs = [10000.0 ** (-k / n) for k in range(n)]
    rows = [[0.0] * head_dim] if cls else []
    off = 1 if cls else 0
    for r in range(grid_h):
        for c in range(grid_w):
            x, y = c + off, r + off
            ang = []
            for f in freqs:
                ang += [x * f, x * f]
            for f in freqs:
                ang += [y * f, y * f]
            rows.append(ang)
    return torch.tensor(rows, dtype=torch.float64)


def ref_rotate(t, angles):
    """(a, b) -> (a cos - b sin, b cos + a sin) as complex multiplication by e^{i angle}."""
    tc = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(tc * torch.polar(torch.ones_like(angles[:, ::2]), angles[:, ::2])).flatten(-2)


def ref_bilinear(grid, out_h, out_w):
    """grid [g_h, g_w, C] -> [out_h, out_w, C], bilinear, align_corners=False, no antialias."""
    def taps(n_in, n_out):
        out = []
        for d in range(n_out):
            s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(s)), n_in - 1)
            out.append((i0, min(i0 + 1, n_in - 1), s - i0))
        return out
    rows, cols = taps(grid.shape[0], out_h), taps(grid.shape[1], out_w)
    res = torch.empty(out_h, out_w, grid.shape[2], dtype=grid.dtype)
    for i, (y0, y1, ly) in enumerate(rows):
        for j, (x0, x1, lx) in enumerate(cols):
            res[i, j] = ((1 - ly) * ((1 - lx) * grid[y0, x0] + lx * grid[y0, x1])
                         + ly * ((1 - lx) * grid[y1, x0] + lx * grid[y1, x1]))
    return res


def ref_mha(q_in, kv_in, w, b, heads, angles=None):
    width = q_in.shape[-1]
    hd = width // heads
    q = q_in @ w[:width].T + b[:width]
    k = kv_in @ w[width:2 * width].T + b[width:2 * width]
    v = kv_in @ w[2 * width:].T + b[2 * width:]
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, hd).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    if angles is not None:
        q, k = ref_rotate(q, angles), ref_rotate(k, angles)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    return (att @ v).transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], width)


def ref_vision_forward(v, images):
    P = {k: t.detach().double() for k, t in v.state_dict().items()}
    cfg = v.cfg
    width, heads, cls = cfg.width, cfg.heads, cfg.use_cls_token
    ln = lambda t, pre: F.layer_norm(t, (width,), P[pre + ".weight"], P[pre + ".bias"], 1e-5)
    x = F.conv2d(images.double(), P["conv1.weight"], stride=cfg.patch_size)
    B, _, gh, gw = x.shape
    x = x.permute(0, 2, 3, 1).reshape(B, gh * gw, width)
    pos = P["positional_embedding"]
    g = cfg.image_size // cfg.patch_size
    grid = ref_bilinear((pos[1:] if cls else pos).reshape(g, g, width), gh, gw).reshape(gh * gw, width)
    if cls:
        x = torch.cat([P["class_embedding"].expand(B, 1, width), x], 1)
        grid = torch.cat([pos[:1], grid])
    x = ln(x + grid, "ln_pre")
    angles = ref_rope_angles(gh, gw, width // heads, cls)
    for i in range(cfg.layers):
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1")
        a = ref_mha(h, h, P[p + "attn.in_proj_weight"], P[p + "attn.in_proj_bias"], heads, angles)
        a = a @ P[p + "attn.out_proj.weight"].T + P[p + "attn.out_proj.bias"]
        x = x + (a * P[p + "ls_1.gamma"] if p + "ls_1.gamma" in P else a)
        h = ln(x, p + "ln_2")
        m = F.gelu(h @ P[p + "mlp.c_fc.weight"].T + P[p + "mlp.c_fc.bias"])
        m = m @ P[p + "mlp.c_proj.weight"].T + P[p + "mlp.c_proj.bias"]
        x = x + (m * P[p + "ls_2.gamma"] if p + "ls_2.gamma" in P else m)
    if cfg.use_ln_post:
        x = ln(x, "ln_post")
    tokens, pooled = x, None
    if cfg.pool_type == "attn":
        q = P["attn_pool.probe"].expand(B, 1, width)
        o = ref_mha(q, x, P["attn_pool.attn.in_proj_weight"], P["attn_pool.attn.in_proj_bias"], 8)
        o = o @ P["attn_pool.attn.out_proj.weight"].T + P["attn_pool.attn.out_proj.bias"]
        h = ln(o, "attn_pool.layernorm")
        o = o + F.gelu(h @ P["attn_pool.mlp.c_fc.weight"].T + P["attn_pool.mlp.c_fc.bias"]) \
            @ P["attn_pool.mlp.c_proj.weight"].T + P["attn_pool.mlp.c_proj.bias"]
        pooled = o[:, 0] @ P["proj"]
    return tokens, pooled


@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("grid", [(3, 5), (6, 2), (4, 4)])  # off-native (native grid is 4x4) and native
def test_rope_angles_independent(cls, grid):
    v = small_vision(use_cls_token=cls)
    cos, sin = v.rope(*grid)
    ang = ref_rope_angles(*grid, 32, cls)
    assert cos.dtype == torch.float32 and cos.shape == ang.shape
    torch.testing.assert_close(cos.double(), ang.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), ang.sin(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid", [(3, 5), (6, 2), (5, 7)])
def test_posemb_resize_independent(grid):
    v = small_vision()
    got = v.abs_posemb(*grid).double()
    pos = v.positional_embedding.detach().double()
    want = ref_bilinear(pos[1:].reshape(4, 4, 64), *grid).reshape(-1, 64)
    torch.testing.assert_close(got[0], pos[0])  # the class row is kept aside
    torch.testing.assert_close(got[1:], want, atol=1e-6, rtol=0)
    assert v.abs_posemb(4, 4) is v.positional_embedding  # native grid: untouched


@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("ls", [None, 0.1])
@pytest.mark.parametrize("hw", [(48, 80), (64, 64), (96, 32)])
def test_forward_matches_reference_any_size(cls, ls, hw):
    v = small_vision(use_cls_token=cls, ls_init_value=ls)
    x = torch.randn(2, 3, *hw)
    tokens_ref, pooled_ref = ref_vision_forward(v, x)
    with torch.no_grad():
        tokens = v.forward_features(x)
        pooled = v.forward_head(tokens)
    assert tokens.shape == (2, (1 if cls else 0) + (hw[0] // 16) * (hw[1] // 16), 64)
    torch.testing.assert_close(tokens.double(), tokens_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled.double(), pooled_ref, atol=1e-4, rtol=1e-4)
    assert pooled.shape == (2, 32)


def test_input_size_must_be_multiple_of_patch():
    v = small_vision()
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        v(torch.randn(1, 3, 60, 64))
    assert v.grid_size(48, 80) == (3, 5)


# --------------------------------------------------------------------------------------------------------
# mask token

def test_mask_token_semantics():
    v = small_vision(use_mask_token=True)
    x = torch.randn(2, 3, 64, 64)
    n = 16
    with torch.no_grad():
        ref = v(x)
        none_masked = torch.zeros(2, n, dtype=torch.bool)
        torch.testing.assert_close(v(x, mask=none_masked), ref, atol=0, rtol=0)
        mask = torch.zeros(2, n, dtype=torch.bool)
        mask[0, [0, 5, 6]] = True
        out = v(x, mask=mask)
        assert not torch.allclose(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])  # a sample without masked patches is unaffected
        # a masked patch's pixels no longer matter: it is replaced by the learned token (row-major order)
        x2 = x.clone()
        x2[0, :, 16:32, 16:32] = torch.randn(3, 16, 16)  # patch (row 1, col 1) = index 5
        torch.testing.assert_close(v(x2, mask=mask), out, atol=1e-6, rtol=0)
        x3 = x.clone()
        x3[0, :, 16:32, 32:48] = torch.randn(3, 16, 16)  # patch index 6, also masked
        torch.testing.assert_close(v(x3, mask=mask), out, atol=1e-6, rtol=0)
        x4 = x.clone()
        x4[0, :, 0:16, 16:32] = torch.randn(3, 16, 16)  # patch index 1, not masked
        assert not torch.allclose(v(x4, mask=mask), out)
    with pytest.raises(ValueError, match="mask must be"):
        v(x, mask=torch.zeros(2, 15, dtype=torch.bool))
    assert "mask_token" in dict(v.named_parameters())
    plain = small_vision()
    assert "mask_token" not in plain.state_dict()
    with pytest.raises(ValueError, match="no mask token"):
        plain(x, mask=mask)
    plain.add_mask_token()
    assert plain.mask_token.shape == (64,) and plain(x, mask=mask).shape == (2, 32)


def test_mask_token_gets_gradient():
    v = small_vision(use_mask_token=True).train()
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :4] = True
    v(torch.randn(1, 3, 64, 64), mask=mask).sum().backward()
    assert v.mask_token.grad is not None and v.mask_token.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------
# intermediates and truncation

def test_forward_intermediates_conventions():
    v = small_vision(layers=4)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        final, inter = v.forward_intermediates(x)
        torch.testing.assert_close(final, v.forward_features(x))
        assert len(inter) == 4 and inter[0].shape == (2, 64, 3, 5)
        last2 = v.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last2[0], inter[2])
        torch.testing.assert_close(last2[1], inter[3])
        neg = v.forward_intermediates(x, indices=[-1, 0], output_fmt="NLC", intermediates_only=True)
        assert len(neg) == 2 and neg[0].shape == (2, 15, 64)  # block order: 0, then 3
        torch.testing.assert_close(neg[0], inter[0].flatten(2).transpose(1, 2))
        torch.testing.assert_close(neg[1], inter[3].flatten(2).transpose(1, 2))
        normed = v.forward_intermediates(x, indices=[1], norm=True, output_fmt="NLC",
                                         return_prefix_tokens=True, intermediates_only=True)
        spatial, prefix = normed[0]
        raw = v.forward_intermediates(x, indices=[1], output_fmt="NLC", return_prefix_tokens=True,
                                      intermediates_only=True)[0]
        full = torch.cat([raw[1], raw[0]], dim=1)
        torch.testing.assert_close(torch.cat([prefix, spatial], 1), v.ln_post(full))
        assert prefix.shape == (2, 1, 64)
        early = v.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[1])
    with pytest.raises(Exception):
        v.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="output_fmt"):
        v.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_truncate_equals_intermediate(cls, k):
    v = small_vision(layers=3, use_cls_token=cls, use_mask_token=True)
    x = torch.randn(2, 3, 64, 48)
    mask = torch.rand(2, 12) < 0.5
    with torch.no_grad():
        spatial, prefix = v.forward_intermediates(x, indices=[k - 1], output_fmt="NLC", return_prefix_tokens=True,
                                                  intermediates_only=True, mask=mask)[0]
        v.truncate(k)
        tokens = v.forward_features(x, mask=mask)
    torch.testing.assert_close(tokens, torch.cat([prefix, spatial], dim=1), atol=0, rtol=0)
    keys = v.state_dict().keys()
    assert not any(key.startswith(("ln_post", "attn_pool", "proj")) for key in keys)
    assert f"transformer.resblocks.{k - 1}.ln_1.weight" in keys and f"transformer.resblocks.{k}.ln_1.weight" not in keys
    assert v.cfg.layers == k and v.cfg.truncated_from == 3 and v.cfg.pool_type == "none" and v.cfg.output_dim is None
    torch.testing.assert_close(v(x, mask=mask), tokens)  # no head: forward gives the tokens
    with pytest.raises(ValueError):
        v.truncate(k + 1)


# --------------------------------------------------------------------------------------------------------
# LayerScale, DropPath, checkpointing, conv stem

def test_set_layer_scale_and_drop_path():
    v = small_vision()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = v(x)
    v.set_layer_scale(0.1)
    sd = v.state_dict()
    for i in range(2):
        for j in (1, 2):
            torch.testing.assert_close(sd[f"transformer.resblocks.{i}.ls_{j}.gamma"], torch.full((64,), 0.1))
    with torch.no_grad():
        assert not torch.allclose(v(x), before)
        v.transformer.resblocks[0].ls_1.gamma.fill_(0.5)
    v.set_layer_scale(0.1)  # existing gammas are kept
    assert v.transformer.resblocks[0].ls_1.gamma[0].item() == 0.5
    assert isinstance(v.transformer.resblocks[1].ls_2, LayerScale)

    v.set_drop_path(0.3)
    assert all(isinstance(b.drop_path, DropPath) and b.drop_path.drop_prob == 0.3 for b in v.transformer.resblocks)
    with torch.no_grad():
        torch.testing.assert_close(v(x), v(x))  # eval: identity
        v.train()
        torch.manual_seed(1)
        a = v(x)
        torch.manual_seed(2)
        b = v(x)
        assert not torch.allclose(a, b)  # train: stochastic depth
    v.set_drop_path(0.0)
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in v.transformer.resblocks)
    assert not any(k.startswith("drop_path") for k in v.state_dict())


def test_grad_checkpointing_same_gradients():
    v = small_vision().train()
    x = torch.randn(2, 3, 64, 64)
    v(x).square().sum().backward()
    g1 = {n: p.grad.clone() for n, p in v.named_parameters()}
    v.zero_grad()
    v.set_grad_checkpointing(True)
    v(x).square().sum().backward()
    for n, p in v.named_parameters():
        torch.testing.assert_close(p.grad, g1[n], atol=1e-6, rtol=1e-5)


def test_conv_stem_tiny():
    m = build_model("tiny", vision={"layers": 1}, text={"layers": 1}).eval()
    v = m.visual
    keys = set(v.state_dict())
    assert "conv1.weight" not in keys and {"stem.0.weight", "stem.2.weight", "stem.4.weight"} <= keys
    assert v.stem[0].out_channels == 32 and v.stem[2].out_channels == 64 and v.stem[4].out_channels == 128
    for size in (32, 48, 64):
        with torch.no_grad():
            tokens = v.forward_features(torch.randn(1, 3, size, size))
        assert tokens.shape == (1, 1 + (size // 8) ** 2, 128)


def test_set_image_size_resamples_posemb():
    v = small_vision()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        before = v(x)
        v.set_image_size(96)
        assert v.positional_embedding.shape == (1 + 36, 64) and v.cfg.image_size == 96
        torch.testing.assert_close(v(x), before)


def test_compile_friendly_no_graph_breaks():
    v = small_vision(use_mask_token=True)
    x = torch.randn(1, 3, 48, 64)
    mask = torch.rand(1, 12) < 0.5
    explain = torch._dynamo.explain(v)(x, mask)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()


def test_bf16_autocast_keeps_rope_fp32():
    v = small_vision()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = v(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = v(x)
    assert out.dtype == torch.bfloat16
    cos, _ = v.rope(4, 4)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def test_conv_stem_keeps_image_content_above_the_position_embedding():
    # PyTorch's default conv init shrank the stem's output ~10x below its input, under the position
    # embedding: the tiny model then learnt colour but never shape. He init keeps the content on top.
    from pe_lightning.models import build_model

    visual = build_model("tiny").visual
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        content = visual.stem(images).std()
    assert content > 0.5 * images.std()
    assert content > 3 * visual.positional_embedding.std()
