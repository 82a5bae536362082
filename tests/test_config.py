"""The recipe loader: layers in order, overrides, and clear errors for typos and bad values."""

import shutil

import pytest
from omegaconf import OmegaConf

from pe_lightning.config import RECIPES_DIR, RecipeError, result_keys
from pe_lightning.stages import load_stage_recipe


def test_layers_merge_in_order():
    cfg = load_stage_recipe("pretrain")
    assert cfg.optim.name == "lamb" and cfg.optim.lr == pytest.approx(3e-3)  # stage file + pretrain/tiny.yaml
    assert [p.resolution for p in cfg.train.phases] == [48, 64]  # pretrain/tiny.yaml (the stage's scale)
    assert cfg.pretrain.mask_reg.enabled and cfg.pretrain.max_logit_scale == 100  # the stage's own Args
    assert cfg.data.augment.crop_ratio_min == pytest.approx(0.9)  # data/shapes.yaml
    assert cfg.data.augment.crop_scale_min == pytest.approx(0.9)  # pretrain/tiny.yaml over data/shapes.yaml's 0.8
    assert load_stage_recipe("video").data.augment.crop_scale_min == pytest.approx(0.8)  # no scale layer sets it
    assert cfg.eval.zeroshot[0].path == "data/shapes/zeroshot/test"  # data/shapes.yaml, interpolation resolved
    assert [c.name for c in cfg.callbacks] == ["checkpoint", "throughput", "clip_eval"]  # the stage's own list


def test_command_line_overrides_win_and_shorthands_expand():
    cfg = load_stage_recipe("pretrain", ["optim.lr=1e-3", "model=PE-Core-B16-224", "run=abc"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.preset == "PE-Core-B16-224"
    assert cfg.train.total_samples == 58_000_000_000  # the model preset's recipe layer was picked up
    assert cfg.run == "abc"


def test_variant_recipe_file():
    cfg = load_stage_recipe("pretrain", recipe="pretrain_vanilla")
    assert cfg.optim.name == "adamw" and not cfg.pretrain.mask_reg.enabled and len(cfg.train.phases) == 0
    assert cfg.stage == "pretrain"


@pytest.mark.parametrize("override, named", [
    ("optim.lrr=1", "optim.lrr"),
    ("trainr.devices=2", "trainr"),
    ("data.augment.hflipp=0", "hflipp"),
    ("pretrain.mask_reg.wieght=2", "wieght"),  # a stage's own keys are checked too
    ("mask_reg.weight=2", "mask_reg"),  # ... and live under the stage's name only
])
def test_unknown_key_is_named(override, named):
    with pytest.raises(RecipeError, match=named):
        load_stage_recipe("pretrain", [override])


def test_bad_value_is_named():
    with pytest.raises(RecipeError, match="total_samples"):
        load_stage_recipe("pretrain", ["train.total_samples=lots"])


def test_unknown_model_field_and_preset_are_named():
    with pytest.raises(RecipeError, match="widht"):
        load_stage_recipe("pretrain", ["model.vision.widht=3"])
    with pytest.raises(RecipeError, match="PE-Core-X99"):
        load_stage_recipe("pretrain", ["model=PE-Core-X99"])


def test_typo_in_a_recipe_file_names_file_and_key(tmp_path):
    for name in ("base.yaml", "pipeline.yaml"):
        (tmp_path / name).write_text((RECIPES_DIR / name).read_text())
    (tmp_path / "pretrain.yaml").write_text("optim:\n  nmae: lamb\n")
    with pytest.raises(RecipeError, match=r"pretrain.yaml.*optim.nmae"):
        load_stage_recipe("pretrain", recipes_dir=tmp_path)


def test_a_scale_layer_key_the_method_file_also_sets_is_an_error(tmp_path):
    shutil.copytree(RECIPES_DIR, tmp_path / "recipes")
    recipes = tmp_path / "recipes"
    (recipes / "video" / "tiny.yaml").write_text("video:\n  image_weight: 2.0\n")  # video.yaml sets it too
    with pytest.raises(RecipeError, match=r"recipes/video/tiny.yaml sets \['video.image_weight'\].*video.yaml"):
        load_stage_recipe("video", recipes_dir=recipes)
    assert load_stage_recipe("pretrain", recipe="pretrain_vanilla").optim.name == "adamw"  # a variant may override


def test_unknown_stage_lists_recipe_files():
    with pytest.raises(RecipeError, match="pretrain"):
        load_stage_recipe("pretrian")


def test_result_keys_ignore_bookkeeping_only():
    a = load_stage_recipe("pretrain")
    b = load_stage_recipe("pretrain", ["run=other", "trainer.progress_bar=false", "trainer.threads=1"])
    c = load_stage_recipe("pretrain", ["optim.lr=0.1"])
    assert result_keys(a) == result_keys(b)
    assert result_keys(a) != result_keys(c)
    assert OmegaConf.is_config(a)


def test_result_keys_leave_out_the_settings_of_a_switched_off_feature():
    off = load_stage_recipe("pretrain", ["pretrain.mask_reg.enabled=false"])
    off_other = load_stage_recipe("pretrain", ["pretrain.mask_reg.enabled=false", "pretrain.mask_reg.weight=3"])
    on_other = load_stage_recipe("pretrain", ["pretrain.mask_reg.weight=3"])
    assert result_keys(off) == result_keys(off_other)  # an inert setting: the runs compute the same
    assert result_keys(off)["pretrain.mask_reg.enabled"] is False
    assert result_keys(load_stage_recipe("pretrain")) != result_keys(on_other)


@pytest.mark.parametrize("overrides, named", [
    (["train.total_samples=60000", "optim.warmup_samples=70000", "train.phases=[]"], "warmup_samples"),
    (["train.phases=[{until_samples: 72000, resolution: 30, batch_size: 64}]"], "multiple of the patch size"),
    (["train.phases=[{until_samples: 72000, resolution: 128, batch_size: 64}]"], "exceeds data.image_size"),
    (["train.phases=[{until_samples: 72000, resolution: 64, batch_size: 60}]"], "chunk"),
])
def test_bad_schedules_fail_when_the_stage_is_built(overrides, named):
    """The stage checks its schedule against its model and data (the config module knows no stage); the
    manager builds the stage before it writes anything, so a bad schedule leaves no run folder."""
    from pe_lightning.stages.pretrain import PretrainStage

    with pytest.raises(RecipeError, match=named):
        PretrainStage(load_stage_recipe("pretrain", overrides))
