"""The pretrain stage learns: a few hundred steps of a small tiny-preset model on the shapes world lift
zero-shot accuracy far above chance (1/48) and colour accuracy far above its chance (1/8)."""

import json

import pytest

from conftest import TINY_MODEL
from pe_lightning.stages import load_stage_recipe
from pe_lightning.pipeline import run_stage

pytestmark = pytest.mark.slow

# Measured on the 2-core CPU machine (42 s): colour 0.90, top-1 0.22, text->image R@10 0.77. Bounds with margin,
# each several times its chance level (colour 1/8, top-1 1/48, R@10 over 64 pairs 10/64).
COLOUR_BOUND = 0.5
TOP1_BOUND = 0.10
RECALL10_BOUND = 0.35
STEPS_SCHEDULE = ["train.total_samples=9600", "optim.warmup_samples=960", "optim.lr=4e-3",
                  "train.phases=[{until_samples: 9600, resolution: 32, batch_size: 32}]",
                  "trainer.checkpoint_every_n_steps=1000", "trainer.progress_bar=false"]


def test_a_few_hundred_steps_learn_far_above_chance(tiny_world, tmp_path):
    overrides = [f"data.root={tiny_world}", "data.generate=false", "data.image_size=32", "data.workers=1",
                 f"runs_dir={tmp_path}", "run=learn", *TINY_MODEL, *STEPS_SCHEDULE,
                 "callbacks=[{name: checkpoint}, {name: clip_eval}]"]
    export = run_stage(load_stage_recipe("pretrain", overrides))
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["samples_seen"] == 9600  # 300 steps of 32
    assert metrics["zeroshot_colour_acc"] >= COLOUR_BOUND, metrics
    assert metrics["zeroshot_top1"] >= TOP1_BOUND, metrics
    assert metrics["retrieval_t2i_r10"] >= RECALL10_BOUND, metrics
