"""`make ablation`: the ladder's rungs are the shipped recipe with changes undone, at equal FLOPs, and the
command trains, resumes and tabulates them (two rungs at a tiny scale)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_run
from pe_lightning.ablation import (FIGURES, Ladder, main, plan, read_ladder, rung_recipe, training_flops)
from pe_lightning.config import RecipeError, result_keys
from pe_lightning.perf import tower_training_flops
from pe_lightning.stages import load_stage_recipe
from pe_lightning.stages.pretrain import pretrain_flops_per_sample


def _keys(cfg) -> dict:
    return {k: v for k, v in result_keys(cfg).items() if k not in ("seed", "run")}


def test_the_last_rung_is_the_shipped_recipe_and_the_first_is_vanilla():
    ladder = read_ladder()
    last = rung_recipe(ladder, len(ladder.changes), 0, "ablation")
    assert _keys(last) == _keys(load_stage_recipe("pretrain"))
    vanilla = rung_recipe(ladder, 0, 0, "ablation")
    assert vanilla.optim.name == "adamw" and not vanilla.train.phases
    assert vanilla.model.vision.use_rope is False and vanilla.model.vision.pool_type == "tok"
    assert vanilla.pretrain.mask_reg.enabled is False and vanilla.data.augment.hflip == 0.0


def test_the_vanilla_recipe_file_is_rung_0():
    """`make stage=pretrain recipe=pretrain_vanilla` and the ladder's vanilla rung are one baseline."""
    vanilla_file = load_stage_recipe("pretrain", recipe="pretrain_vanilla")
    assert _keys(vanilla_file) == _keys(rung_recipe(read_ladder(), 0, 0, "ablation"))


def test_each_rung_adds_only_its_change():
    """Rung k differs from rung k-1 only in the keys change k undoes (the phases: progressive, final)."""
    ladder = read_ladder()
    recipes = [_keys(rung_recipe(ladder, k, 0, "ablation")) for k in range(len(ladder.rung_names))]
    for k, change in enumerate(ladder.changes, start=1):
        changed = {key for key in recipes[k].keys() | recipes[k - 1].keys()
                   if recipes[k].get(key) != recipes[k - 1].get(key)}
        undone = {word.split("=", 1)[0] for word in change.undo}
        switched = tuple(key[: -len("enabled")] for key in undone if key.endswith(".enabled"))
        # the settings of a feature the change switches on appear with it
        changed = {key for key in changed if key in undone or not key.startswith(switched)}
        assert changed, f"rung {k} ({change.name}) changes nothing"
        assert changed <= undone | {"train.phases"}, (change.name, changed - undone)


def test_every_rung_spends_the_vanilla_flops():
    """Equal FLOPs: cheap low-resolution phases buy more samples (as in the paper), the mask copies fewer."""
    runs = plan(read_ladder(), "ablation")
    budget = training_flops(runs[0].cfg)
    for p in runs:
        assert training_flops(p.cfg) == pytest.approx(budget, rel=0.01), p.cfg.run
    samples = {p.rung: p.cfg.train.total_samples for p in runs}
    assert samples[1] > samples[0]  # progressive resolution: more samples
    assert samples[7] < samples[6]  # mask regularization: its masked copies cost vision passes


def test_flops_per_sample_counts_the_masked_copies():
    cfg = load_stage_recipe("pretrain")
    towers = tower_training_flops("tiny", 64, dict(cfg.model.vision), dict(cfg.model.text))
    fraction = cfg.pretrain.mask_reg.batch_fraction
    assert pretrain_flops_per_sample(cfg, 64) == pytest.approx(towers["text"] + towers["vision"] * (1 + fraction))


def test_bad_ladders_name_the_problem(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("changes: []\nrepeats: [1]\n")
    with pytest.raises(RecipeError, match="unknown key.*repeats"):
        read_ladder(bad_key)
    typo = tmp_path / "typo.yaml"
    typo.write_text("changes:\n  - {name: RoPE, undo: ['model.vision.use_ropes=false']}\n")
    with pytest.raises(RecipeError, match="rung 0 \\(vanilla\\).*use_ropes"):
        rung_recipe(read_ladder(typo), 0, 0, "x")
    with pytest.raises(RecipeError, match="rungs=\\[9\\]"):
        plan(read_ladder(), "ablation", rungs=[9])
    with pytest.raises(RecipeError, match="not found"):
        read_ladder(tmp_path / "missing.yaml")


TINY_LADDER = """
seeds: [0]
repeat_seeds: [1]
changes:
  - name: progressive resolution
    undo: ["train.phases=[]", "train.batch_size=16"]
  - name: mask regularization
    undo: ["pretrain.mask_reg.enabled=false"]
"""


@pytest.mark.slow
def test_two_rungs_train_resume_and_tabulate(tiny_world, tmp_path, capsys):
    """The suite's two rungs: vanilla and the full tiny recipe, the end points with a repeat seed. A second
    command finds every rung DONE and only rewrites the table."""
    ladder_file = tmp_path / "ladder.yaml"
    ladder_file.write_text(TINY_LADDER)
    args = [f"ladder={ladder_file}", "rungs=0,2", *tiny_run(tiny_world, tmp_path / "runs"),
            "callbacks=[{name: clip_eval}]", "run=abl"]  # run= names the ladder's runs
    out = main(args)
    rows = json.loads((out.parent / "ablation.json").read_text())
    assert [(r["rung"], r["seeds"]) for r in rows] == [(0, 2), (2, 2)]
    for row in rows:
        for key, _ in FIGURES:
            assert len(row[key]) == 2 and all(0.0 <= v <= 1.0 for v in row[key]), (row["name"], key)
        # whole batches of 32 in ~200 samples: equal to a batch (the shipped ladder's test holds it to 1%)
        assert row["train_flops"][0] == pytest.approx(rows[0]["train_flops"][0], rel=0.15)
    assert rows[1]["samples_seen"][0] > rows[0]["samples_seen"][0]  # low-resolution phase: more samples
    table = out.read_text()
    assert "| 0 | vanilla | 2 |" in table and "| 2 | mask-regularization | 2 |" in table and "±" in table
    assert (out.parent / "ablation.png").stat().st_size > 10_000
    assert out == tmp_path / "runs" / "abl" / "ablation.md"
    done = sorted(p.parent.parent.name for p in (tmp_path / "runs").glob("abl-*/pretrain/DONE"))
    assert done == ["abl-0-vanilla-s0", "abl-0-vanilla-s1", "abl-2-mask-regularization-s0",
                    "abl-2-mask-regularization-s1"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("abl-*/pretrain/export/model.pt")}
    capsys.readouterr()
    main(args)  # everything DONE: nothing retrains
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert "| 0 | vanilla | 2 |" in capsys.readouterr().out


def test_lr_sweep_scales_each_rung_own_lr():
    ladder = read_ladder()
    from dataclasses import replace

    swept = plan(replace(ladder, lr_scales=(0.5, 2.0), repeat_seeds=()), "ablation", rungs=[0, 7])
    lrs = {(p.rung, p.lr_scale): p.cfg.optim.lr for p in swept}
    assert lrs[(0, 0.5)] == pytest.approx(2.5e-4) and lrs[(0, 2.0)] == pytest.approx(1e-3)
    pe_lr = load_stage_recipe("pretrain").optim.lr
    assert lrs[(7, 2.0)] == pytest.approx(2 * pe_lr)
    assert len({p.cfg.run for p in swept}) == len(swept)  # every run its own folder
    assert isinstance(ladder, Ladder)
