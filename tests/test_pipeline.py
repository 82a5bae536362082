"""The stage manager: parents, DONE, init= versus resume, config-change refusal, status."""

import json

import pytest
from omegaconf import OmegaConf

from pe_lightning.config import load_recipe
from pe_lightning.pipeline import (PipelineError, StageDir, init_weights, parent_exports, read_pipeline,
                                   resume_checkpoint, run_pipeline, run_stage, status, write_atomic_text)


def recipe(tmp_path, stage="pretrain", *overrides):
    return load_recipe(stage, [f"runs_dir={tmp_path}", "run=r", *overrides])


def finish(tmp_path, stage, metrics=None):
    sdir = StageDir(tmp_path / "r" / stage)
    sdir.export.mkdir(parents=True)
    (sdir.export / "model.pt").write_bytes(b"weights")
    (sdir.export / "metrics.json").write_text(json.dumps(metrics or {}))
    sdir.done.write_text("{}")
    return sdir


def test_pipeline_lists_all_five_stages_with_parents():
    pipeline = read_pipeline()
    assert list(pipeline) == ["pretrain", "video", "distill", "lang", "spatial"]
    assert pipeline["video"] == ["pretrain"] and pipeline["spatial"] == ["video"]


def test_missing_parent_names_the_stage_to_run_first(tmp_path):
    cfg = recipe(tmp_path)
    cfg.stage = "video"
    with pytest.raises(PipelineError, match=r"make stage=pretrain run=r"):
        parent_exports(cfg, read_pipeline())


def test_parent_export_is_found_once_done(tmp_path):
    sdir = finish(tmp_path, "pretrain")
    cfg = recipe(tmp_path)
    cfg.stage = "video"
    assert init_weights(cfg, read_pipeline()) == sdir.weights


def test_init_overrides_parent_and_must_exist(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    cfg = recipe(tmp_path, "pretrain", f"init={weights}")
    cfg.stage = "video"
    assert init_weights(cfg, read_pipeline()) == weights  # no parent needed with init=
    cfg.init = str(tmp_path / "missing.pt")
    with pytest.raises(PipelineError, match="no such file"):
        init_weights(cfg, read_pipeline())


def test_done_stage_is_skipped(tmp_path):
    sdir = finish(tmp_path, "pretrain")
    assert run_stage(recipe(tmp_path)) == sdir.export  # returns at once: nothing is trained


def test_unbuilt_stage_is_rejected_not_skipped(tmp_path):
    finish(tmp_path, "pretrain")
    with pytest.raises(PipelineError, match="not available yet"):
        run_pipeline("r", [f"runs_dir={tmp_path}"])


def _unfinished(tmp_path, cfg):
    sdir = StageDir(tmp_path / "r" / "pretrain")
    sdir.checkpoint.parent.mkdir(parents=True)
    sdir.checkpoint.write_bytes(b"ckpt")
    write_atomic_text(sdir.config, OmegaConf.to_yaml(cfg))
    return sdir


def test_init_and_resume_together_is_an_error(tmp_path):
    cfg = recipe(tmp_path)
    sdir = _unfinished(tmp_path, cfg)
    cfg.init = str(sdir.checkpoint)
    with pytest.raises(PipelineError, match="drop init="):
        resume_checkpoint(cfg, sdir)


def test_resume_refuses_a_changed_recipe_and_lists_the_keys(tmp_path):
    sdir = _unfinished(tmp_path, recipe(tmp_path))
    assert resume_checkpoint(recipe(tmp_path, "pretrain", "trainer.progress_bar=false"), sdir) == sdir.checkpoint
    changed = recipe(tmp_path, "pretrain", "optim.lr=0.5", "mask_reg.weight=2")
    with pytest.raises(PipelineError, match=r"(?s)mask_reg.weight.*optim.lr.*resume=force"):
        resume_checkpoint(changed, sdir)
    changed.resume = "force"
    assert resume_checkpoint(changed, sdir) == sdir.checkpoint


def test_status_reports_each_state(tmp_path):
    assert "not started" in status(str(tmp_path), "r").splitlines()[1]
    sdir = StageDir(tmp_path / "r" / "pretrain")
    sdir.root.mkdir(parents=True)
    sdir.progress.write_text(json.dumps({"samples_seen": 1234, "step": 20}))
    assert "interrupted at 1234 samples" in status(str(tmp_path), "r")
    sdir.progress.unlink()
    finish(tmp_path, "pretrain", {"zeroshot_top1": 0.75, "samples_seen": 60000})
    lines = status(str(tmp_path), "r").splitlines()
    assert "done" in lines[1] and "zeroshot_top1=0.75" in lines[1]
    assert "not available yet" in lines[2]
