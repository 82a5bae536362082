"""Text tower, tokenizer and the CLIP wrapper (encode_image / encode_text / encode_video / forward)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pe_lightning.models import PECLIP, build_model, get_preset, get_tokenizer
from pe_lightning.models.presets import TextConfig
from pe_lightning.models.text import TextTransformer

SOT, EOT = 49406, 49407


def small_clip(**kw):
    torch.manual_seed(0)
    return build_model("tiny", vision={"layers": 1, "width": 64, "heads": 2, "mlp_dim": 128},
                       text={"layers": 2, "width": 64, "heads": 2, "mlp_dim": 128}, **kw).eval()


# --------------------------------------------------------------------------------------------------------
# tokenizer

def test_tokenizer_layout():
    tok = get_tokenizer(12)
    out = tok(["a red square", "A  RED   square"])
    assert out.dtype == torch.long and out.shape == (2, 12)
    assert out[0, 0] == SOT
    eot_pos = int((out[0] == EOT).nonzero()[0, 0])
    assert eot_pos == 4 and (out[0, eot_pos + 1:] == 0).all()  # SOT a red square EOT pad...
    assert torch.equal(out[0], out[1])  # lower-cased, whitespace-cleaned
    assert tok("a red square").shape == (1, 12)
    assert tok.decode(out[0]) == "a red square"
    long = tok(" ".join(["circle"] * 40))
    assert long.shape == (1, 12) and long[0, -1] == EOT and (long[0] != 0).all()  # truncated, EOT last
    assert tok.vocab_size == 49408
    with pytest.raises(TypeError):
        tok([1, 2])


# --------------------------------------------------------------------------------------------------------
# text tower

def test_text_init_follows_clip():
    torch.manual_seed(0)
    cfg = TextConfig(context_length=32, width=256, layers=4, heads=4, mlp_dim=1024, output_dim=128)
    t = TextTransformer(cfg)
    assert t.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert t.positional_embedding.std().item() == pytest.approx(0.01, rel=0.1)
    assert t.text_projection.shape == (256, 128)
    assert t.text_projection.std().item() == pytest.approx(256 ** -0.5, rel=0.05)
    blk = t.transformer.resblocks[0]
    proj_std = 256 ** -0.5 * (2 * 4) ** -0.5
    assert blk.attn.in_proj_weight.std().item() == pytest.approx(256 ** -0.5, rel=0.05)
    assert blk.attn.out_proj.weight.std().item() == pytest.approx(proj_std, rel=0.1)
    assert blk.mlp.c_fc.weight.std().item() == pytest.approx((2 * 256) ** -0.5, rel=0.05)
    assert blk.mlp.c_proj.weight.std().item() == pytest.approx(proj_std, rel=0.05)
    assert blk.ln_1.eps == 1e-5 and t.ln_final.eps == 1e-5
    names = set(t.state_dict())
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
            "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_proj.bias"} <= names


def ref_text(t: TextTransformer, tokens):
    """Independent forward: additive causal mask, explicit softmax, float64."""
    P = {k: v.detach().double() for k, v in t.state_dict().items()}
    W, H = t.text_cfg.width, t.text_cfg.heads
    ln = lambda x, p: F.layer_norm(x, (W,), P[p + ".weight"], P[p + ".bias"], 1e-5)
    B, L = tokens.shape
    x = P["token_embedding.weight"][tokens] + P["positional_embedding"][:L]
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(t.text_cfg.layers):
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1")
        qkv = h @ P[p + "attn.in_proj_weight"].T + P[p + "attn.in_proj_bias"]
        q, k, v = (z.reshape(B, L, H, W // H).transpose(1, 2) for z in qkv.split(W, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(W // H) + causal, -1) @ v
        a = a.transpose(1, 2).reshape(B, L, W) @ P[p + "attn.out_proj.weight"].T + P[p + "attn.out_proj.bias"]
        x = x + a
        h = ln(x, p + "ln_2")
        x = x + F.gelu(h @ P[p + "mlp.c_fc.weight"].T + P[p + "mlp.c_fc.bias"]) @ P[p + "mlp.c_proj.weight"].T \
            + P[p + "mlp.c_proj.bias"]
    x = ln(x, "ln_final")
    eot = [int(row.tolist().index(EOT)) for row in tokens]
    return x[torch.arange(B), eot] @ P["text_projection"]


def test_text_forward_reference_and_eot_pooling():
    m = small_clip()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = get_tokenizer(32)(["a red square left of a blue circle", "two green triangles", "x"])
    with torch.no_grad():
        out = m.encode_text(tokens)
    torch.testing.assert_close(out.double(), ref_text(m, tokens), atol=1e-5, rtol=1e-5)
    # causal + pooled at EOT: tokens after the EOT (padding) do not matter
    noisy = tokens.clone()
    noisy[2, 3:] = torch.randint(1, 40000, (29,))
    with torch.no_grad():
        torch.testing.assert_close(m.encode_text(noisy)[2], out[2], atol=1e-6, rtol=0)
        normed = m.encode_text(tokens, normalize=True)
    torch.testing.assert_close(normed, F.normalize(out, dim=-1))
    short = tokens[:, :8]  # shorter sequences use the first positions
    assert m.encode_text(short).shape == (3, 128)
    with pytest.raises(ValueError, match="context length"):
        m.encode_text(torch.zeros(1, 33, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------
# CLIP wrapper

def test_clip_layout_and_forward():
    m = small_clip()
    keys = set(m.state_dict())
    assert "logit_scale" in keys and "token_embedding.weight" in keys and "visual.stem.0.weight" in keys
    assert m.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    images = torch.randn(2, 3, 64, 64)
    tokens = get_tokenizer(32)(["a red square", "a blue circle"])
    with torch.no_grad():
        img, txt, scale = m(images, tokens)
        torch.testing.assert_close(img, F.normalize(m.encode_image(images), dim=-1))
        torch.testing.assert_close(txt, m.encode_text(tokens, normalize=True))
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert m.encode_image(images).norm(dim=-1).sub(1).abs().max() > 1e-3  # un-normalised by default


def test_encode_video_is_mean_of_frames():
    m = small_clip()
    frames = torch.randn(2, 3, 3, 48, 48)
    with torch.no_grad():
        per_frame = torch.stack([m.encode_image(frames[:, t]) for t in range(3)], dim=1)
        video = m.encode_video(frames)
        torch.testing.assert_close(video, per_frame.mean(dim=1), atol=1e-5, rtol=1e-5)
        # normalize=True is Meta's: each frame normalised, then averaged (not the normalised mean)
        torch.testing.assert_close(m.encode_video(frames, normalize=True), F.normalize(per_frame, dim=-1).mean(1),
                                   atol=1e-5, rtol=1e-5)
        assert not torch.allclose(m.encode_video(frames, normalize=True), F.normalize(per_frame.mean(1), dim=-1))
    with pytest.raises(ValueError, match="frames"):
        m.encode_video(torch.randn(2, 3, 48, 48))


def test_vision_only_models():
    cfg = get_preset("PE-Spatial-T16-512", vision={"layers": 1, "image_size": 64})
    m = PECLIP(cfg).eval()
    assert m.vision_only and m.logit_scale is None
    assert all(k.startswith("visual.") for k in m.state_dict())
    with pytest.raises(RuntimeError, match="vision-only"):
        m.encode_text(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(RuntimeError, match="pooling"):
        m.encode_image(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        assert m.visual(torch.randn(1, 3, 64, 64)).shape == (1, 17, 192)  # tokens
    # truncation shows up in the model's config
    core = small_clip()
    core.visual.truncate(1)
    assert core.cfg.vision.pool_type == "none" and core.cfg.vision.truncated_from == 1


def test_class_token_pooling_has_a_head():
    """The vanilla-CLIP baseline pools the class token: encode_image must work (it once refused every model
    without an attention-pooling head, so the baseline crashed in its first FLOP count)."""
    torch.manual_seed(0)
    m = build_model("tiny", vision={"layers": 1, "pool_type": "tok", "use_rope": False}).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = m.visual.forward_features(images)
        torch.testing.assert_close(m.encode_image(images), tokens[:, 0] @ m.visual.proj)


def test_clip_grad_flows_and_checkpointing():
    m = small_clip().train()
    m.set_grad_checkpointing(True)
    images = torch.randn(2, 3, 32, 32)
    tokens = get_tokenizer(32)(["a", "b"])
    img, txt, scale = m(images, tokens)
    logits = scale * img @ txt.T
    loss = F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2))
    loss.backward()
    for name in ("logit_scale", "visual.proj", "text_projection", "token_embedding.weight",
                 "visual.stem.0.weight", "visual.attn_pool.probe"):
        assert m.get_parameter(name).grad is not None, name
