"""Parity with the independent implementations at the native resolution: timm's `vit_pe_*` (weights converted
with timm's own `checkpoint_filter_fn` from our Meta-layout export) and open_clip's `PE-Core-T-16-384`
(random weights loaded through our open_clip-format import). Also our timm-format import."""

import pytest
import timm
import torch
from timm.models.eva import checkpoint_filter_fn

from pe_lightning.models import PECLIP, get_preset, load_checkpoint, to_meta_state_dict

TOL = dict(atol=1e-5, rtol=1e-5)


def randomize(model, scale=0.1, skip=()):
    """Non-trivial values everywhere (LN gains, biases, LayerScale gammas), reproducible."""
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in skip:
                p.add_(torch.randn_like(p) * scale)


# (our preset + vision overrides, timm model name + kwargs, native image size)
CASES = {
    "core_cls": (
        "PE-Core-T16-384", dict(image_size=64, width=64, layers=2, heads=2, mlp_dim=256, output_dim=32),
        "vit_pe_core_tiny_patch16_384", dict(img_size=64, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0,
                                              ref_feat_shape=(4, 4), num_classes=32)),
    "g_style_no_cls": (
        "PE-Core-G14-448", dict(image_size=56, width=64, layers=3, heads=4, mlp_dim=192, output_dim=48),
        "vit_pe_core_gigantic_patch14_448", dict(img_size=56, embed_dim=64, depth=3, num_heads=4, mlp_ratio=3.0,
                                                  ref_feat_shape=(4, 4), num_classes=48)),
    "layerscale_lang": (
        "PE-Lang-L14-448", dict(image_size=56, width=64, layers=2, heads=4, mlp_dim=256, truncated_from=None),
        "vit_pe_lang_large_patch14_448", dict(img_size=56, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
                                               ref_feat_shape=(4, 4))),
    "layerscale_spatial_g": (
        "PE-Spatial-G14-448", dict(image_size=56, width=64, layers=2, heads=4, mlp_dim=128),
        "vit_pe_spatial_gigantic_patch14_448", dict(img_size=56, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                                                     ref_feat_shape=(4, 4))),
}


def build_pair(case):
    preset, vision, timm_name, timm_kwargs = CASES[case]
    torch.manual_seed(0)
    ours = PECLIP(get_preset(preset, vision=vision, text=None)).eval()
    randomize(ours)
    ref = timm.create_model(timm_name, pretrained=False, **timm_kwargs).eval()
    return ours, ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_timm_parity_via_timm_converter(case):
    ours, ref = build_pair(case)
    converted = checkpoint_filter_fn(to_meta_state_dict(ours), ref)  # timm's own Meta -> timm conversion
    ref.load_state_dict(converted, strict=True)
    size = ours.visual.cfg.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        tokens, ref_tokens = ours.visual.forward_features(x), ref.forward_features(x)
        torch.testing.assert_close(tokens, ref_tokens, **TOL)
        if ours.visual.attn_pool is not None:
            torch.testing.assert_close(ours.visual(x), ref.forward_head(ref_tokens), **TOL)
            assert ours.visual(x).shape == (2, ours.visual.cfg.output_dim)
        ours_int = ours.visual.forward_intermediates(x, indices=[0, -1], norm=True, intermediates_only=True)
        ref_int = ref.forward_intermediates(x, indices=[0, -1], norm=True, intermediates_only=True)
        for a, b in zip(ours_int, ref_int):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("case", ["core_cls", "g_style_no_cls", "layerscale_lang"])
def test_timm_format_import(case):
    ours, ref = build_pair(case)
    randomize(ref, skip=("head.bias",))  # timm's head bias stays zero: PE's proj has none
    fresh = PECLIP(ours.cfg).eval()
    report = load_checkpoint(fresh.visual, ref.state_dict())
    assert report.format == "timm"
    size = ours.visual.cfg.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fresh.visual.forward_features(x), ref.forward_features(x), **TOL)
        if fresh.visual.attn_pool is not None:
            torch.testing.assert_close(fresh.visual(x), ref(x), **TOL)
    if case == "core_cls":
        sd = ref.state_dict()
        sd["head.bias"] = torch.ones_like(sd["head.bias"])
        with pytest.raises(Exception, match="head.bias"):
            load_checkpoint(fresh.visual, sd)


def test_open_clip_parity_pe_core_t():
    import open_clip

    torch.manual_seed(0)
    oc = open_clip.create_model("PE-Core-T-16-384", pretrained=None).eval()
    randomize(oc, scale=0.02, skip=("visual.trunk.head.bias",))
    ours = PECLIP(get_preset("PE-Core-T16-384")).eval()
    report = load_checkpoint(ours, oc.state_dict())
    assert report.format == "open_clip"
    images = torch.randn(2, 3, 384, 384)
    texts = open_clip.get_tokenizer("PE-Core-T-16-384")(["a photo of a red cube", "two dogs on a beach"])
    assert texts.shape == (2, 32)
    from pe_lightning.models import get_tokenizer
    assert torch.equal(get_tokenizer(32)(["a photo of a red cube", "two dogs on a beach"]), texts)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), oc.encode_image(images), **TOL)
        torch.testing.assert_close(ours.encode_text(texts), oc.encode_text(texts), **TOL)
        torch.testing.assert_close(ours.logit_scale, oc.logit_scale)
