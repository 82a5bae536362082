"""The deeper, narrower tiny preset (#28): twice the blocks at about tiny's training FLOPs, and run at tiny's
stage scales."""

from __future__ import annotations

import pytest

from pe_lightning.models import get_preset
from pe_lightning.perf import tower_training_flops
from pe_lightning.stages import load_stage_recipe


@pytest.mark.parametrize("resolution", [64, 96, 128])
def test_tiny_deep_costs_about_what_tiny_costs(resolution):
    deep, tiny = get_preset("tiny-deep").vision, get_preset("tiny").vision
    assert (deep.layers, deep.width) == (8, 96) and tiny.layers == 4
    a, b = tower_training_flops("tiny-deep", resolution), tower_training_flops("tiny", resolution)
    assert abs(a["vision"] / b["vision"] - 1) < 0.06
    assert a["text"] == b["text"]


def test_tiny_deep_runs_at_tiny_s_stage_scale():
    deep = load_stage_recipe("pretrain", ["model=tiny-deep"])
    tiny = load_stage_recipe("pretrain", [])
    assert deep.model.preset == "tiny-deep"
    assert deep.train == tiny.train and deep.optim == tiny.optim  # recipes/pretrain/tiny.yaml merged
    assert get_preset(deep.model.preset, vision=dict(deep.model.vision)).vision.layers == 8
