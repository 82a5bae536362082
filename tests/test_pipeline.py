"""The stage manager: parents, DONE, init= versus resume, config-change refusal, status."""

import json

import pytest
from omegaconf import OmegaConf

from pe_lightning import stages
from pe_lightning.io import write_text_atomic
from pe_lightning.pipeline import (PipelineError, StageDir, parent_exports, read_pipeline, resume_checkpoint,
                                   run_pipeline, run_stage, stage_overrides, status)
from pe_lightning.stages import load_stage_recipe
from pe_lightning.stages.pretrain import PretrainStage


@pytest.fixture
def only_pretrain(monkeypatch):
    """A registry with pretrain alone: the later stages of recipes/pipeline.yaml are then unavailable."""
    monkeypatch.setattr(stages, "STAGES", {"pretrain": PretrainStage})
    import pe_lightning.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "STAGES", stages.STAGES)


@pytest.fixture
def video_registered(monkeypatch):
    """A stand-in `video` stage (pretrain's class, role `init`), so parent lookup can be tested here."""
    monkeypatch.setitem(stages.STAGES, "video", PretrainStage)


def recipe(tmp_path, stage="pretrain", *overrides):
    return load_stage_recipe(stage, [f"runs_dir={tmp_path}", "run=r", *overrides])


def finish(tmp_path, stage, metrics=None):
    sdir = StageDir(tmp_path / "r" / stage)
    sdir.export.mkdir(parents=True)
    (sdir.export / "model.pt").write_bytes(b"weights")
    (sdir.export / "metrics.json").write_text(json.dumps(metrics or {}))
    sdir.done.write_text("{}")
    return sdir


def test_pipeline_lists_all_five_stages_with_parents_by_role():
    pipeline = read_pipeline()
    assert list(pipeline) == ["pretrain", "video", "distill", "lang", "spatial"]
    assert pipeline["pretrain"] == {} and pipeline["video"] == {"init": "pretrain"}
    assert pipeline["distill"] == {"teacher": "video"}
    assert pipeline["spatial"] == {"init": "video", "teacher": "video"}


def test_pipeline_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("stages:\n  pretrain: {}\n  video: {parent: pretrain}\n")
    with pytest.raises(PipelineError, match=r"unknown parent role.*parent"):
        read_pipeline(bad)
    bad.write_text("stages:\n  video: {init: pretrain}\n  pretrain: {}\n")
    with pytest.raises(PipelineError, match="not listed before it"):
        read_pipeline(bad)


def test_missing_parent_names_the_stage_to_run_first(tmp_path, video_registered):
    cfg = recipe(tmp_path)
    cfg.stage = "video"
    with pytest.raises(PipelineError, match=r"make stage=pretrain run=r"):
        parent_exports(cfg, read_pipeline())
    assert parent_exports(cfg, read_pipeline(), fresh=False) == {}  # resuming: the weights are in the ckpt


def test_parent_export_is_found_once_done(tmp_path, video_registered):
    sdir = finish(tmp_path, "pretrain")
    cfg = recipe(tmp_path)
    cfg.stage = "video"
    parents = parent_exports(cfg, read_pipeline())
    assert list(parents) == ["init"] and parents["init"].weights == sdir.weights
    assert parents["init"].folder == sdir.export


def test_init_overrides_parent_and_must_exist(tmp_path, video_registered):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    cfg = recipe(tmp_path, "pretrain", f"init={weights}")
    cfg.stage = "video"
    assert parent_exports(cfg, read_pipeline())["init"].weights == weights  # no parent needed with init=
    cfg.init = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        parent_exports(cfg, read_pipeline())


def test_pipeline_overrides_reach_the_stages_they_name():
    pipeline = read_pipeline()
    shares = stage_overrides(pipeline, ["seed=3", "lang:train.batch_size=16", "lang.lm=/lm", "init=/PE-Core.pt",
                                        "data.train=[{urls: 'a:b'}]"])
    assert shares["lang"] == ["seed=3", "train.batch_size=16", "lang.lm=/lm", "data.train=[{urls: 'a:b'}]"]
    assert shares["pretrain"] == ["seed=3", "init=/PE-Core.pt", "data.train=[{urls: 'a:b'}]"]
    assert shares["video"] == shares["spatial"] == ["seed=3", "data.train=[{urls: 'a:b'}]"]
    with pytest.raises(PipelineError, match=r"'lnag' is not a stage of the pipeline"):
        stage_overrides(pipeline, ["lnag:optim.lr=1"])


def test_done_stage_is_skipped(tmp_path):
    sdir = finish(tmp_path, "pretrain")
    assert run_stage(recipe(tmp_path)) == sdir.export  # returns at once: nothing is trained


def test_done_stage_with_another_recipe_is_refused_not_skipped(tmp_path):
    """A finished run whose recipe has changed since (a ladder rung after the default moved) is named, not
    silently reported; cosmetic keys do not count; resume=force keeps the old export."""
    sdir = finish(tmp_path, "pretrain")
    write_text_atomic(sdir.config, OmegaConf.to_yaml(recipe(tmp_path)))
    assert run_stage(recipe(tmp_path, "pretrain", "trainer.threads=1")) == sdir.export
    with pytest.raises(PipelineError, match=r"(?s)DONE with another recipe.*pretrain.mask_reg.weight: .* -> 2.*Delete"):
        run_stage(recipe(tmp_path, "pretrain", "pretrain.mask_reg.weight=2"))
    assert run_stage(recipe(tmp_path, "pretrain", "pretrain.mask_reg.weight=2", "resume=force")) == sdir.export


def test_unbuilt_stage_is_rejected_not_skipped(tmp_path, only_pretrain):
    finish(tmp_path, "pretrain")
    with pytest.raises(PipelineError, match=r"not available.*available: \['pretrain'"):
        run_pipeline("r", [f"runs_dir={tmp_path}"])


def _unfinished(tmp_path, cfg):
    sdir = StageDir(tmp_path / "r" / "pretrain")
    sdir.checkpoint.parent.mkdir(parents=True)
    sdir.checkpoint.write_bytes(b"ckpt")
    write_text_atomic(sdir.config, OmegaConf.to_yaml(cfg))
    return sdir


def test_init_and_resume_together_is_an_error(tmp_path):
    cfg = recipe(tmp_path)
    sdir = _unfinished(tmp_path, cfg)
    cfg.init = str(sdir.checkpoint)
    with pytest.raises(PipelineError, match="drop init="):
        resume_checkpoint(cfg, sdir)


def test_resume_accepts_the_init_it_started_with(tmp_path):
    started = recipe(tmp_path)
    started.init = str(tmp_path / "parent.pt")
    sdir = _unfinished(tmp_path, started)
    again = recipe(tmp_path)
    again.init = started.init  # the same command line, run again after a kill
    assert resume_checkpoint(again, sdir) == sdir.checkpoint
    again.init = str(tmp_path / "other.pt")
    with pytest.raises(PipelineError, match=r"started from .*parent\.pt"):
        resume_checkpoint(again, sdir)


def test_resume_refuses_a_changed_recipe_and_lists_the_keys(tmp_path):
    sdir = _unfinished(tmp_path, recipe(tmp_path))
    assert resume_checkpoint(recipe(tmp_path, "pretrain", "trainer.progress_bar=false"), sdir) == sdir.checkpoint
    changed = recipe(tmp_path, "pretrain", "optim.lr=0.5", "pretrain.mask_reg.weight=2")
    with pytest.raises(PipelineError, match=r"(?s)optim.lr.*pretrain.mask_reg.weight.*resume=force"):
        resume_checkpoint(changed, sdir)
    changed.resume = "force"
    assert resume_checkpoint(changed, sdir) == sdir.checkpoint


def test_resume_of_a_run_older_than_a_key_counts_the_key_at_its_default(tmp_path):
    """A run started before a recipe key existed resumes when the key is at its schema default (it behaved so),
    and is refused when the recipe moves the key away from it."""
    old = OmegaConf.to_container(recipe(tmp_path, "pretrain", "optim.no_decay_lr_scale=1.0"))
    del old["optim"]["no_decay_lr_scale"]  # the saved config.yaml of a run from before the key
    old = OmegaConf.create(old)
    sdir = _unfinished(tmp_path, old)
    assert resume_checkpoint(recipe(tmp_path, "pretrain", "optim.no_decay_lr_scale=1.0"), sdir) == sdir.checkpoint
    with pytest.raises(PipelineError, match=r"optim.no_decay_lr_scale: 1.0 -> 0.5"):
        resume_checkpoint(recipe(tmp_path, "pretrain", "optim.no_decay_lr_scale=0.5"), sdir)


def test_status_reports_each_state(tmp_path, only_pretrain):
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


def test_status_prints_each_stage_headline_with_its_gain(tmp_path):
    """One line per stage: the figure the stage is for, and its gain over the baseline it must beat."""
    finish(tmp_path, "pretrain", {"zeroshot_top1": 0.65})
    finish(tmp_path, "distill", {"zeroshot_top1": 0.365, "scratch_zeroshot_top1": 0.188})
    finish(tmp_path, "lang", {"vqa_exact_match": 0.70, "vqa_blind_exact_match": 0.45})
    finish(tmp_path, "spatial", {"dense_miou": 0.27, "parent_dense_miou": 0.28, "data_skipped": 3})
    lines = {line.split()[0]: line for line in status(str(tmp_path), "r").splitlines()[1:]}
    assert "zero-shot top-1 65.0%" in lines["pretrain"]
    assert "not started" in lines["video"]
    assert "zero-shot top-1 36.5% (+17.7 over scratch)" in lines["distill"]
    assert "VQA exact match 70.0% (+25.0 over blind)" in lines["lang"]
    assert "dense mIoU 27.0% (-1.0 over the parent)" in lines["spatial"] and "data_skipped=3" in lines["spatial"]


def test_corrupt_init_file_is_one_line_and_leaves_no_run_folder(tmp_path):
    """A truncated weights file: a short error naming it, read before anything is written."""
    import subprocess
    import sys

    bad = tmp_path / "PE-Core-T16-384.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = subprocess.run([sys.executable, "-m", "pe_lightning.cli", "train", "stage=pretrain",
                             f"runs_dir={tmp_path / 'runs'}", "run=r", f"init={bad}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot read checkpoint {bad}: not a PyTorch checkpoint (truncated or corrupt?); give "
                      "a weights file saved by torch.save (a stage's export/model.pt or a released Meta PE-*.pt)"]
    assert "pickle" not in result.stderr.lower()
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_pipeline_starts_from_a_released_meta_file(tiny_world, tmp_path):
    """`make pipeline init=PE-Core-T16-384.pt model=PE-Core-T16-384`: a random file in Meta's layout for a
    released configuration (reduced in depth and width) starts the chain's root; the next stage starts from
    the root's export, not from the file."""
    import shutil

    import torch

    from conftest import tiny_run
    from pe_lightning.config import RECIPES_DIR
    from pe_lightning.models import build_model
    from pe_lightning.models.checkpoint import export_checkpoint, load_checkpoint

    vision = dict(image_size=32, width=64, layers=2, heads=2, mlp_dim=128, output_dim=32)
    text = dict(width=64, layers=1, heads=2, mlp_dim=128, output_dim=32)
    torch.manual_seed(0)
    released = tmp_path / "PE-Core-T16-384.pt"
    export_checkpoint(build_model("PE-Core-T16-384", vision=vision, text=text), released)
    recipes = tmp_path / "recipes"  # the real recipes with a two-stage pipeline: pretrain -> video
    shutil.copytree(RECIPES_DIR, recipes)
    (recipes / "pipeline.yaml").write_text("stages:\n  pretrain: {}\n  video: {init: pretrain}\n")
    words = [w for w in tiny_run(tiny_world, tmp_path / "runs", "callbacks=[{name: checkpoint}]")
             if not w.startswith(("run=", "train.phases="))]
    run_pipeline("t", [*words, "model=PE-Core-T16-384", f"init={released}", "trainer.threads=1",
                       "train.phases=[{until_samples: 192, resolution: 32, batch_size: 16}]",
                       "video:train.phases=[]", "video:data.chunk_size=8", "video:video.clip_batch_size=8",
                       "video:video.image_batch_size=8"], recipe_dir=recipes, probes=False)
    run = tmp_path / "runs" / "t"
    assert OmegaConf.load(run / "pretrain" / "config.yaml").init == str(released)
    assert OmegaConf.load(run / "video" / "config.yaml").init is None  # from the pretrain export
    for stage in ("pretrain", "video"):
        model = build_model("PE-Core-T16-384", vision=vision, text=text)
        assert not load_checkpoint(model, run / stage / "export" / "model.pt").missing
    start = torch.load(released, weights_only=True)
    trained = torch.load(run / "pretrain" / "export" / "model.pt", weights_only=True)
    assert start.keys() == trained.keys() and not torch.equal(start["visual.conv1.weight"], trained["visual.conv1.weight"])
