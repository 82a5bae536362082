"""The stage contract, for every registered stage: it builds from its recipe at a tiny scale, trains, exports,
stops and resumes to the same weights, and its export reloads. A test stage with a frozen teacher proves the
teacher is rebuilt on every start and never lands in a checkpoint or an export. Every recipe file loads
against the schema of the stage it names, and each stage recipe runs two steps through the command line.

A new stage gets these tests by registering (pe_lightning/stages/__init__.py) and adding its tiny-scale
overrides to SMOKE below.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import stop_after, tiny_run
from test_lang_stage import lang_smoke
from pe_lightning import stages
from pe_lightning.config import NOT_STAGE_FILES, RECIPES_DIR
from pe_lightning.exports import Export
from pe_lightning.pipeline import PipelineError, StageDir, read_pipeline, run_stage
from pe_lightning.stages import STAGES, load_stage_recipe
from pe_lightning.stages.losses import clip_loss
from pe_lightning.stages.pretrain import PretrainStage

# Per stage: overrides (beyond tiny_run's) that make a whole run take seconds.
SMOKE: dict[str, list[str]] = {
    "pretrain": [],
    "distill": ["distill.scratch_baseline=true"],  # teacher: the video export (the pipeline runs it first)
    "spatial": ["train.phases=[{until_samples: 192, resolution: 32, batch_size: 16}]"],  # one grid: the cache's
    "video": ["train.phases=[]", "data.chunk_size=8", "video.clip_batch_size=8", "video.image_batch_size=8"],
    "lang": lang_smoke(),  # a tiny random LM (built once in the temp dir), 2 warm-up steps then the full phase
}

def _recipe(stage: str, world: Path, runs: Path, *extra: str, recipe: str | None = None):
    return load_stage_recipe(stage, tiny_run(world, runs, "callbacks=[{name: checkpoint}]", *SMOKE.get(stage, []),
                                             *extra), recipe=recipe)


def _weights(export: Path) -> dict:
    return torch.load(export / "model.pt", weights_only=True)


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _run_with_parents(stage: str, world: Path, runs: Path, *extra: str) -> Path:
    """Run `stage` at the tiny scale, running first every parent it needs (in pipeline order)."""
    pipeline = read_pipeline()
    for parent in dict.fromkeys(pipeline.get(stage, {}).values()):
        if not StageDir(runs / "t" / parent).done.exists():
            _run_with_parents(parent, world, runs)
    return run_stage(_recipe(stage, world, runs, *extra), pipeline)


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_registered_stage_trains_exports_stops_resumes_and_reloads(stage, tiny_world, tmp_path):
    reference = _weights(_run_with_parents(stage, tiny_world, tmp_path / "reference"))

    runs = tmp_path / "stopped"
    callbacks = f"callbacks=[{{name: checkpoint}}, {stop_after(tmp_path)}]"
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        _run_with_parents(stage, tiny_world, runs, callbacks)
    sdir = StageDir(runs / "t" / stage)
    assert sdir.checkpoint.exists() and not sdir.done.exists()
    export = run_stage(_recipe(stage, tiny_world, runs), read_pipeline())  # resumes
    _assert_equal(_weights(export), reference)

    parent = Export.at(export)
    model = parent.build_model()  # the export's own structure (model.json), strict load
    assert sum(p.numel() for p in model.parameters()) > 0


# ----- a test stage with a frozen teacher -----------------------------------------------------------------
@dataclass
class TeacherArgs:
    weight: float = 1.0  # of the feature term
    teacher: str | None = None  # weights of the teacher, instead of the pipeline's teacher parent


class TeacherStage(PretrainStage):
    """CLIP loss + MSE of the image embedding to a frozen teacher's (a copy of the parent)."""

    name = "withteacher"
    Args = TeacherArgs
    roles = ("init", "teacher")
    builds = 0  # build_teacher calls, over the class

    def build_model(self, init):  # the plain CLIP model (no mask token: this stage has no mask regularization)
        return super(PretrainStage, self).build_model(init)

    def build_teacher(self, parent):
        TeacherStage.builds += 1
        return super().build_teacher(parent)

    def loss(self, batch, phase):
        from pe_lightning.data.transforms import resize_to

        images = resize_to(batch["image"], phase.resolution)
        features = self.model.encode_image(images)
        with torch.no_grad():
            target = self.teacher.encode_image(images)
        loss = clip_loss(features, self.model.encode_text(batch["text"]), self.model.logit_scale)
        return loss + self.args.weight * torch.nn.functional.mse_loss(features, target)


@pytest.fixture
def teacher_stage(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES_DIR, recipes)
    (recipes / "withteacher.yaml").write_text("optim: {name: adamw}\n")
    monkeypatch.setitem(stages.STAGES, "withteacher", TeacherStage)
    TeacherStage.builds = 0
    return recipes, {"pretrain": {}, "withteacher": {"init": "pretrain", "teacher": "pretrain"}}


def test_frozen_teacher_is_rebuilt_on_resume_and_never_saved(tiny_world, tmp_path, teacher_stage):
    recipes, pipeline = teacher_stage
    runs = tmp_path / "runs"
    run_stage(load_stage_recipe("pretrain", tiny_run(tiny_world, runs, "callbacks=[]")), pipeline)
    parent_weights = _weights(StageDir(runs / "t" / "pretrain").export)

    def recipe(*extra):
        return load_stage_recipe("withteacher", tiny_run(tiny_world, runs, *extra), recipes_dir=recipes)

    callbacks = f"callbacks=[{{name: checkpoint}}, {stop_after(tmp_path)}]"
    with pytest.raises(PipelineError, match="resume"):
        run_stage(recipe(callbacks), pipeline)
    assert TeacherStage.builds == 1
    sdir = StageDir(runs / "t" / "withteacher")
    ckpt = torch.load(sdir.checkpoint, weights_only=False, map_location="cpu")
    assert not any("teacher" in k for k in ckpt["state_dict"])
    assert all(k.startswith("model.") for k in ckpt["state_dict"])

    export = run_stage(recipe("callbacks=[{name: checkpoint}]"), pipeline)  # resume: the teacher is rebuilt
    assert TeacherStage.builds == 2
    exported = _weights(export)
    assert exported.keys() == parent_weights.keys()  # the student's keys only, no teacher copy
    assert any(not torch.equal(exported[k], parent_weights[k]) for k in exported)  # the student trained

    stage = TeacherStage(recipe(), parents={"init": Export.at(sdir.export), "teacher": Export.at(
        StageDir(runs / "t" / "pretrain").export)})
    teacher = stage.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in stage.parameters() for q in teacher.parameters())  # outside DDP's sync
    assert not any(k.startswith("_frozen") or "teacher" in k for k in stage.state_dict())
    stage.train()
    assert not teacher.training  # stays in eval mode
    stage.double()
    assert next(teacher.parameters()).dtype == torch.float64  # moved and cast with the stage
    for key, value in parent_weights.items():  # the teacher is the parent, exactly
        if key.startswith("visual."):
            sub = teacher.visual.state_dict()[key[len("visual."):]]
            torch.testing.assert_close(sub.float(), value.float())


def test_gradient_clipping_is_the_stages(tiny_world, tmp_path):
    """AdamW: the stage clips the global norm at optim.grad_clip; LAMB: it leaves it to the optimizer."""
    for name, clipped in (("adamw", True), ("lamb", False)):
        cfg = load_stage_recipe("pretrain", tiny_run(tiny_world, tmp_path, f"optim.name={name}",
                                                     "optim.grad_clip=0.01"))
        stage = PretrainStage(cfg)
        for p in stage.parameters():
            p.grad = torch.ones_like(p)
        calls = []
        stage.clip_gradients = lambda opt, gradient_clip_val, gradient_clip_algorithm: calls.append(
            (gradient_clip_val, gradient_clip_algorithm))
        stage.configure_gradient_clipping(None)
        assert calls == ([(0.01, "norm")] if clipped else [])


# ----- recipes --------------------------------------------------------------------------------------------
def _recipe_files() -> list[Path]:
    return sorted(p for p in RECIPES_DIR.rglob("*.yaml") if p.name not in NOT_STAGE_FILES
                  and p.parent.name not in ("models", "data"))


def _stage_of(path: Path) -> tuple[str, str | None, str | None]:
    """(stage, recipe variant, model preset) a recipe file belongs to: <stage>[_variant].yaml or
    <stage>/<preset>.yaml."""
    if path.parent != RECIPES_DIR:
        return path.parent.name, None, path.stem
    stage = next((s for s in STAGES if path.stem == s or path.stem.startswith(s + "_")), path.stem)
    return stage, path.stem, None


@pytest.mark.parametrize("path", _recipe_files(), ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_recipe_file_loads_against_its_stage_schema(path):
    stage, recipe, preset = _stage_of(path)
    assert stage in STAGES, f"{path} names no registered stage"
    cfg = load_stage_recipe(stage, [f"model={preset}"] if preset else [], recipe=recipe)
    assert cfg.stage == stage and cfg.callbacks, "a stage recipe lists its own callbacks"
    if preset is None:  # build it: its schedule is valid for its model (paper-scale layers are not built here)
        assert isinstance(stages.stage_class(stage)(cfg), stages.PEStage)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in _recipe_files() if p.parent == RECIPES_DIR],
                         ids=lambda p: p.stem)
def test_every_stage_recipe_runs_two_steps_through_the_cli(path, tiny_world, tmp_path):
    """Each stage recipe (variants included) through `pe-lightning train` with its default callbacks."""
    stage, recipe, _ = _stage_of(path)
    runs = tmp_path / "runs"
    for parent in dict.fromkeys(read_pipeline().get(stage, {}).values()):
        _run_with_parents(parent, tiny_world, runs)
    overrides = [o for o in tiny_run(tiny_world, runs, *SMOKE.get(stage, [])) if not o.startswith("train.")]
    batch = 16
    overrides += ["train.total_samples=32", f"train.batch_size={batch}", "train.phases=[]",
                  "optim.warmup_samples=0", "train.log_every_n_steps=1"]
    result = subprocess.run([sys.executable, "-m", "pe_lightning.cli", "train", f"stage={stage}",
                             f"recipe={recipe}", *overrides], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sdir = StageDir(runs / "t" / stage)
    assert sdir.done.exists()
    assert json.loads((sdir.export / "metrics.json").read_text())["samples_seen"] == 32

