"""Checkpoint import / export: Meta layout round trip, wrappers and prefixes, vision-only files, truncated
towers, mask token, strict errors, corrupt files, atomic writes."""

import os

import pytest
import torch

from pe_lightning.models import (CheckpointError, PECLIP, build_model, detect_format, export_checkpoint,
                                 get_preset, load_checkpoint, read_state_dict, to_meta_state_dict)

SMALL = dict(vision={"layers": 2, "width": 64, "heads": 2, "mlp_dim": 128},
             text={"layers": 1, "width": 64, "heads": 2, "mlp_dim": 128})


def small(seed=0, **kw):
    torch.manual_seed(seed)
    over = {k: dict(v) for k, v in SMALL.items()}
    for k, v in kw.items():
        over.setdefault(k, {}).update(v) if isinstance(v, dict) else over.__setitem__(k, v)
    return build_model("tiny", **over).eval()


def core_like(seed=0, **vision):
    """A Meta-style (conv1 patchify) Core model, reduced."""
    torch.manual_seed(seed)
    v = dict(image_size=64, width=64, layers=3, heads=2, mlp_dim=128, output_dim=32)
    v.update(vision)
    return build_model("PE-Core-T16-384", vision=v, text={"layers": 1, "width": 64, "heads": 2, "mlp_dim": 128,
                                                          "output_dim": 32}).eval()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_export_import_round_trip(tmp_path):
    a, b = small(0), small(1)
    path = export_checkpoint(a, tmp_path / "export" / "model.pt")
    assert path.is_file() and os.listdir(path.parent) == ["model.pt"]  # no temporary left behind
    sd = torch.load(path, weights_only=True)
    assert "logit_scale" in sd and "token_embedding.weight" in sd and "visual.stem.0.weight" in sd
    assert all(not k.startswith("text.") for k in sd) and "visual.mask_token" not in sd
    report = load_checkpoint(b, path)
    assert report.format == "meta" and report.loaded == len(b.state_dict())
    assert_same_weights(a, b)
    x, t = torch.randn(1, 3, 64, 64), torch.randint(1, 49000, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x), atol=0, rtol=0)
        torch.testing.assert_close(a.encode_text(t), b.encode_text(t), atol=0, rtol=0)


def test_meta_layout_keys_and_overwrite(tmp_path):
    a = core_like()
    sd = to_meta_state_dict(a)
    for k in ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
              "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.attn.out_proj.bias",
              "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.ln_post.bias", "visual.attn_pool.probe",
              "visual.attn_pool.attn.in_proj_bias", "visual.attn_pool.layernorm.weight", "visual.attn_pool.mlp.c_proj.weight",
              "visual.proj", "token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
              "logit_scale", "transformer.resblocks.0.ln_1.weight"):
        assert k in sd, k
    assert sd["visual.proj"].shape == (64, 32) and sd["visual.positional_embedding"].shape == (17, 64)
    assert not any("ls_1" in k for k in sd)
    # exporting over an existing file replaces it whole
    path = tmp_path / "m.pt"
    path.write_bytes(b"old")
    export_checkpoint(a, path)
    assert torch.load(path, weights_only=True).keys() == sd.keys()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "weights", "module"])
def test_meta_wrappers_and_prefixes(tmp_path, wrap):
    a, b = core_like(0), core_like(1)
    sd = to_meta_state_dict(a)
    if wrap == "state_dict":
        obj = {"state_dict": sd, "epoch": 3}
    elif wrap == "weights":
        obj = {"weights": sd}
    elif wrap == "module":
        obj = {"module." + k: v for k, v in sd.items()}
    else:
        obj = sd
    torch.save(obj, tmp_path / "f.pt")
    load_checkpoint(b, tmp_path / "f.pt")
    assert_same_weights(a, b)


def test_mask_token_export_and_tolerated_absence(tmp_path):
    a = small(0, vision={"use_mask_token": True})
    b = small(1, vision={"use_mask_token": True})
    init = b.visual.mask_token.detach().clone()
    report = load_checkpoint(b, to_meta_state_dict(a))  # Meta-style file: no mask token
    assert report.kept_at_init == ["visual.mask_token"]
    torch.testing.assert_close(b.visual.mask_token, init)
    sd = to_meta_state_dict(a, include_mask_token=True)
    assert "visual.mask_token" in sd
    load_checkpoint(b, sd)
    assert_same_weights(a, b)
    with pytest.raises(CheckpointError, match="mask_token"):
        load_checkpoint(small(2), sd)  # a model without a mask token: unexpected key


def test_vision_only_files(tmp_path):
    a = core_like(0)
    v_sd = to_meta_state_dict(a, vision_only=True)
    assert all(k.startswith("visual.") for k in v_sd)
    # bare keys, as PE-Lang / PE-Spatial files may have them
    bare = {k[len("visual."):]: v for k, v in v_sd.items()}
    for src in (v_sd, bare):
        target = PECLIP(get_preset(core_like().cfg, text=None))
        load_checkpoint(target, src)
        assert_same_weights(a.visual, target.visual)
        vt = core_like(3).visual
        load_checkpoint(vt, src)  # straight into a VisionTransformer
        assert_same_weights(a.visual, vt)
    # a CLIP file into a vision-only target: the text keys are dropped, reported
    report = load_checkpoint(core_like(4).visual, to_meta_state_dict(a))
    assert "logit_scale" in report.dropped and "token_embedding.weight" in report.dropped
    # a vision-only file into a CLIP model: strict error with a hint
    with pytest.raises(CheckpointError, match="vision-only") as e:
        load_checkpoint(core_like(5), bare)
    assert "token_embedding.weight" in str(e.value) or "missing keys" in str(e.value)


def test_truncated_model_drops_cut_blocks_explicitly():
    full = core_like(0, layers=3)
    cut = core_like(1, layers=3)
    cut.visual.truncate(2)
    report = load_checkpoint(cut, to_meta_state_dict(full))
    assert "visual.transformer.resblocks.2.ln_1.weight" in report.dropped
    assert "visual.proj" in report.dropped and "visual.attn_pool.probe" in report.dropped
    assert "visual.ln_post.weight" in report.dropped
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        inter = full.visual.forward_intermediates(x, indices=[1], output_fmt="NLC", return_prefix_tokens=True,
                                                  intermediates_only=True)[0]
        torch.testing.assert_close(cut.visual.forward_features(x), torch.cat([inter[1], inter[0]], 1))
    # an untruncated model with fewer blocks is not silently cut: strict error
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(core_like(2, layers=2), to_meta_state_dict(full))
    # a PE-Lang-style preset (truncated_from set) from a full file, as Lang-from-Core
    lang_cfg = get_preset("PE-Lang-L14-448", vision=dict(image_size=64, patch_size=16, width=64, layers=2, heads=2,
                                                         mlp_dim=128, truncated_from=3, ls_init_value=None))
    lang = PECLIP(lang_cfg)
    load_checkpoint(lang, to_meta_state_dict(full))
    with torch.no_grad():
        torch.testing.assert_close(lang.visual(x), cut.visual(x))


def test_strict_errors_name_keys_and_preset(tmp_path):
    a = core_like(0)
    sd = to_meta_state_dict(a)
    del sd["visual.ln_pre.weight"]
    sd["visual.extra_thing"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(core_like(1), sd)
    msg = str(e.value)
    assert "visual.ln_pre.weight" in msg and "visual.extra_thing" in msg and "PE-Core-T16-384" in msg
    assert "1 [" in msg  # counts
    # many missing keys: first few plus a count
    with pytest.raises(CheckpointError, match=r"more\)"):
        load_checkpoint(core_like(1), {"visual.conv1.weight": sd["visual.conv1.weight"]})
    # wrong preset: shape mismatches are named
    with pytest.raises(CheckpointError, match="shape mismatches") as e:
        load_checkpoint(build_model("tiny"), to_meta_state_dict(a))
    assert "'tiny'" in str(e.value)
    # non-strict load reports instead
    report = load_checkpoint(core_like(2), sd, strict=False)
    assert report.missing == ["visual.ln_pre.weight"] and report.unexpected == ["visual.extra_thing"]


def test_posemb_grid_mismatch_and_resize():
    a = core_like(0)
    b = core_like(1, image_size=96)
    with pytest.raises(CheckpointError, match="resize_pos_embed"):
        load_checkpoint(b, to_meta_state_dict(a))
    report = load_checkpoint(b, to_meta_state_dict(a), resize_pos_embed=True)
    assert report.resized == ["visual.positional_embedding"]
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():  # a at 96 px resizes its posemb on the fly the same way
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x), atol=1e-5, rtol=1e-5)


def test_layer_scale_mismatch_hint():
    a = core_like(0)
    a.visual.set_layer_scale(0.1)
    with pytest.raises(CheckpointError, match="set_layer_scale"):
        load_checkpoint(core_like(1), to_meta_state_dict(a))
    b = core_like(1)
    b.visual.set_layer_scale(0.5)
    load_checkpoint(b, to_meta_state_dict(a))
    assert_same_weights(a, b)


def test_unreadable_files(tmp_path):
    m = core_like()
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(m, bad)
    half = tmp_path / "half.pt"
    torch.save(to_meta_state_dict(m), half)
    half.write_bytes(half.read_bytes()[:1000])  # truncated write
    with pytest.raises(CheckpointError, match="half.pt"):
        load_checkpoint(m, half)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(m, tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_model("tiny", checkpoint=tmp_path / "nope.pt")
    torch.save({"foo.bar": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unrecognised"):
        load_checkpoint(m, tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt"):
        load_checkpoint(m, tmp_path / "list.pt")


def test_build_model_with_checkpoint_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    a = small(0)
    export_checkpoint(a, tmp_path / "a.pt")
    assert_same_weights(a, build_model("tiny", checkpoint=tmp_path / "a.pt", **SMALL))
    save_file(to_meta_state_dict(a), str(tmp_path / "a.safetensors"))
    assert_same_weights(a, build_model("tiny", checkpoint=tmp_path / "a.safetensors", **SMALL))


def test_detect_format():
    assert detect_format({"visual.conv1.weight": 0}) == "meta"
    assert detect_format({"conv1.weight": 0}) == "meta"
    assert detect_format({"visual.trunk.pos_embed": 0, "text.token_embedding.weight": 0}) == "open_clip"
    assert detect_format({"patch_embed.proj.weight": 0, "blocks.0.norm1.weight": 0}) == "timm"
    sd, where = read_state_dict({"module.visual.conv1.weight": torch.zeros(1)})
    assert list(sd) == ["visual.conv1.weight"] and where == "<state dict>"


def test_compiled_submodule_export_and_load():
    a, b = small(0), small(1)
    a.visual = torch.compile(a.visual)  # wrapping only: keys gain `_orig_mod.`
    b.visual = torch.compile(b.visual)
    assert any("_orig_mod" in k for k in a.state_dict())
    sd = to_meta_state_dict(a)
    assert not any("_orig_mod" in k for k in sd) and "visual.stem.0.weight" in sd
    load_checkpoint(b, sd)
    assert_same_weights(a, b)
    plain = small(2)
    load_checkpoint(plain, sd)
    torch.testing.assert_close(plain.visual.ln_pre.weight, a.visual.ln_pre.weight)
