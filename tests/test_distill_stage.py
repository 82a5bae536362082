"""The distill stage (issue 12): its loss is clip_distill_loss of the towers' outputs (plus the baseline's CLIP
loss on disjoint parameters), the teacher reads its own resolution and tokens, stays frozen and outside every
checkpoint and export, is rebuilt on resume (which is exact, the baseline included), gradient accumulation
averages micro-batch gradients, a cached teacher gives the online teacher's targets, the three models are
evaluated side by side, DDP equals one process, and user errors are one clear line.

The teacher is a random tiny export of another shape than the student (embedding 48 vs 32, context 16 vs 32),
so every test also covers unequal widths and context lengths.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import stop_after, tiny_run
from pe_lightning.config import RecipeError
from pe_lightning.data.transforms import resize_to
from pe_lightning.exports import Export, ExportError, write_model_json
from pe_lightning.models import build_model, export_checkpoint, get_tokenizer
from pe_lightning.pipeline import PipelineError, StageDir, build_stage, read_pipeline, run_stage
from pe_lightning.stages import load_stage_recipe
from pe_lightning.stages.distill import DistillStage, DistillTeacherError
from pe_lightning.stages.distill_losses import DistillWidthError, clip_distill_loss
from pe_lightning.stages.losses import clip_loss
from pe_lightning.stages.optim import set_lr
from pe_lightning.stages.phases import Phase
from pe_lightning.trainer import fit_stage

TEACHER_VISION = dict(width=64, layers=1, heads=2, mlp_dim=128, output_dim=48, image_size=32)
TEACHER_TEXT = dict(width=64, layers=1, heads=2, mlp_dim=128, output_dim=48, context_length=16)
TEACHER_LOGIT_SCALE = math.log(30.0)

SAVE_SCRATCH = '''
import lightning as L, torch
class SaveScratch(L.Callback):
    def __init__(self, path):
        self.path = path
    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.scratch_model().state_dict(), self.path)
'''


def _teacher_model() -> torch.nn.Module:
    torch.manual_seed(123)
    model = build_model("tiny", vision=TEACHER_VISION, text=TEACHER_TEXT)
    with torch.no_grad():
        model.logit_scale.fill_(TEACHER_LOGIT_SCALE)
    return model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A finished export folder (model.pt + model.json) of a random tiny teacher."""
    folder = tmp_path_factory.mktemp("teacher") / "export"
    folder.mkdir()
    model = _teacher_model()
    export_checkpoint(model, folder / "model.pt")
    write_model_json(model, folder)
    return folder


# the recipe's loss (pure distillation + projected feature term), unless a test says otherwise
def _recipe(world, runs, teacher, *extra):
    return load_stage_recipe("distill", tiny_run(world, runs, f"distill.teacher={teacher}", "callbacks=[]", *extra))


PLAIN = ["distill.contrastive_weight=1", "distill.feature_weight=0", "distill.feature_projection=false"]


def _stage(world, runs, teacher, *extra) -> DistillStage:
    cfg = _recipe(world, runs, teacher, *extra)
    L.seed_everything(cfg.seed, verbose=False)
    return DistillStage(cfg, parents={"teacher": Export.at(teacher)})


def _batch(n: int = 6, size: int = 32) -> dict:
    captions = [f"a {c} square on the left" for c in ("red", "blue", "green", "white", "black", "yellow")][:n]
    torch.manual_seed(7)
    return {"image": torch.rand(n, 3, size, size), "text": get_tokenizer(32)(captions),
            "teacher_tokens": get_tokenizer(16)(captions), "captions": captions}


# ----- the loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, kw", [
    (PLAIN, dict(teacher_scale=None, distill_weight=1.0, contrastive_weight=1.0, feature_weight=0.0)),
    ([*PLAIN, "distill.teacher_scale=50", "distill.contrastive_weight=0", "distill.teacher_resolution=16"],
     dict(teacher_scale=50.0, distill_weight=1.0, contrastive_weight=0.0, feature_weight=0.0)),
    ([*PLAIN, "distill.feature_weight=3", "distill.feature_projection=true", "distill.distill_weight=0.5"],
     dict(teacher_scale=None, distill_weight=0.5, contrastive_weight=1.0, feature_weight=3.0)),
    ([], dict(teacher_scale=None, distill_weight=1.0, contrastive_weight=0.0, feature_weight=3000.0)),
], ids=["own-scales", "fixed-50-pure-distill-teacher-16px", "feature-term-projected", "the-recipe"])
def test_loss_is_clip_distill_loss_of_the_towers_plus_the_baselines_clip_loss(tiny_world, tmp_path, teacher_dir,
                                                                              extra, kw):
    stage = _stage(tiny_world, tmp_path, teacher_dir, "distill.scratch_baseline=true", *extra)
    batch, phase = _batch(), Phase(None, 16, 6)
    teacher_res = 16 if "distill.teacher_resolution=16" in extra else 32  # default: the teacher's native 32 px
    assert stage.teacher_resolution == teacher_res
    # the baseline starts from the distilled student's weights, and is a separate module
    for a, b in zip(stage.model.state_dict().values(), stage.scratch.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p is q for p in stage.model.parameters() for q in stage.scratch.parameters())

    loss = stage.loss(batch, phase)

    s, t, b = stage.model, _teacher_model(), stage.scratch  # an independent copy of the teacher
    images = resize_to(batch["image"], 16)
    with torch.no_grad():
        t_img = t.encode_image(resize_to(batch["image"], teacher_res))
        t_txt = t.encode_text(batch["teacher_tokens"])  # the teacher's own 16-token context
    distill = clip_distill_loss(s.encode_image(images), s.encode_text(batch["text"]), s.logit_scale, t_img, t_txt,
                                t.logit_scale, projector=stage.distill_loss.projector, **kw).total
    scratch = clip_loss(b.encode_image(images), b.encode_text(batch["text"]), b.logit_scale)
    torch.testing.assert_close(loss, distill + scratch, rtol=1e-5, atol=1e-6)

    # each student gets only its own term's gradient
    student_params = list(s.parameters())
    grads = torch.autograd.grad(loss, student_params, retain_graph=True, allow_unused=True)
    ref = torch.autograd.grad(distill, student_params, allow_unused=True)
    for g, r in zip(grads, ref):
        assert (g is None and r is None) or torch.allclose(g, r, atol=1e-6)
    scratch_grads = torch.autograd.grad(loss, list(b.parameters()))
    for g, r in zip(scratch_grads, torch.autograd.grad(scratch, list(b.parameters()))):
        torch.testing.assert_close(g, r)


def test_the_teacher_reads_its_own_tokens_from_the_loader(tiny_world, tmp_path, teacher_dir):
    stage = _stage(tiny_world, tmp_path, teacher_dir)
    dm = stage.datamodule()
    dm.keep_captions = True
    batch = next(iter(dm.train_dataloader()))
    assert batch["text"].shape[1] == 32 and batch["teacher_tokens"].shape[1] == 16
    assert torch.equal(batch["teacher_tokens"], get_tokenizer(16)(batch["caption"]))
    assert torch.equal(batch["text"], get_tokenizer(32)(batch["caption"]))


def test_a_teacher_with_the_students_context_reads_the_students_tokens(tiny_world, tmp_path):
    folder = tmp_path / "same_ctx"
    folder.mkdir()
    model = build_model("tiny", vision=TEACHER_VISION, text={**TEACHER_TEXT, "context_length": 32})
    export_checkpoint(model, folder / "model.pt")
    write_model_json(model, folder)
    stage = _stage(tiny_world, tmp_path, folder)
    assert stage.tokenizers()[1] is None
    assert "teacher_tokens" not in next(iter(stage.datamodule().train_dataloader()))


# ----- frozen teacher, checkpoint, resume, export -------------------------------------------------------------
@pytest.mark.slow
def test_teacher_frozen_absent_from_checkpoints_rebuilt_on_resume_and_resume_is_exact(tiny_world, tmp_path,
                                                                                       teacher_dir, monkeypatch):
    builds = []
    original = DistillStage.build_teacher
    monkeypatch.setattr(DistillStage, "build_teacher", lambda self, parent: builds.append(1) or original(self, parent))
    saver = tmp_path / "save_scratch.py"
    saver.write_text(SAVE_SCRATCH)
    extra = ["distill.scratch_baseline=true", "distill.feature_weight=1", "distill.feature_projection=true"]

    def cbs(runs, *more):
        return "callbacks=[{name: checkpoint}, " + ", ".join(
            [f"{{name: '{saver}:SaveScratch', args: {{path: '{runs}/scratch.pt'}}}}", *more]) + "]"

    whole = tmp_path / "whole"
    reference = run_stage(_recipe(tiny_world, whole, teacher_dir, *extra, cbs(whole)), read_pipeline())
    parts = tmp_path / "parts"
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        run_stage(_recipe(tiny_world, parts, teacher_dir, *extra,
                          cbs(parts, stop_after(tmp_path))), read_pipeline())
    ckpt = torch.load(StageDir(parts / "t" / "distill").checkpoint, weights_only=False, map_location="cpu")
    keys = list(ckpt["state_dict"])
    assert not any("teacher" in k for k in keys)
    assert {k.split(".")[0] for k in keys} == {"model", "scratch", "distill_loss"}  # student, baseline, projector
    assert "scratch_optimizer" in ckpt
    builds_before = len(builds)
    export = run_stage(_recipe(tiny_world, parts, teacher_dir, *extra, cbs(parts)), read_pipeline())  # resumes
    assert len(builds) == builds_before + 1  # the teacher is rebuilt from its export on resume

    a, b = torch.load(reference / "model.pt"), torch.load(export / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa, sb = torch.load(whole / "scratch.pt"), torch.load(parts / "scratch.pt")
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"scratch {key}"

    # the export is the student alone, in Meta's layout, reloadable with its own structure (no projector)
    student = Export.at(export).build_model()
    assert student.visual.cfg.output_dim == 32 and not any("proj.weight" == k or "projector" in k for k in a)
    assert not any(k.startswith(("scratch", "distill_loss", "teacher")) for k in a)


def test_the_teacher_is_frozen_outside_the_state_dict_and_follows_the_stage(tiny_world, tmp_path, teacher_dir):
    stage = _stage(tiny_world, tmp_path, teacher_dir, "distill.scratch_baseline=true")
    teacher = stage.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("_frozen") or "teacher" in k for k in stage.state_dict())
    stage.train()
    assert not teacher.training
    stage.double()
    assert next(teacher.parameters()).dtype == torch.float64
    reference = _teacher_model().state_dict()
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value.float(), reference[key].float())


# ----- gradient accumulation ------------------------------------------------------------------------------------
def test_gradient_accumulation_averages_the_micro_batch_gradients(tiny_world, tmp_path, teacher_dir):
    """accumulate_grad_batches=2 with micro-batches of 16: one optimizer step on the mean of the two micro-batch
    gradients, each with soft targets over its own 16 samples; the baseline's step is accumulated the same way."""
    extra = ["distill.scratch_baseline=true", "optim.name=adamw", "optim.grad_clip=0", "train.phases=[]",
             "train.batch_size=16", "train.total_samples=32", "optim.warmup_samples=0",
             "trainer.accumulate_grad_batches=2", "distill.scratch_lr=5e-4"]
    stage = _stage(tiny_world, tmp_path / "lightning", teacher_dir, *extra)
    reference = _stage(tiny_world, tmp_path / "by_hand", teacher_dir, *extra)
    init = copy.deepcopy(stage.state_dict())
    for k, v in reference.state_dict().items():
        assert torch.equal(v, init[k])
    grads_at_step: dict = {}
    stage.on_before_optimizer_step = lambda optimizer: grads_at_step.update(
        {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None})
    fit_stage(stage, tmp_path / "lightning_root", None)
    assert stage.samples_seen == 32 and stage.trainer.global_step == 1

    dm = reference.datamodule()
    loader = iter(dm.train_dataloader())
    micro = [next(loader), next(loader)]
    optimizer = reference.configure_optimizers()
    phase = reference.phase()
    for batch in micro:
        (reference.loss(batch, phase) / 2).backward()
    named = dict(reference.named_parameters())
    assert grads_at_step.keys() == {n for n, p in named.items() if p.grad is not None}
    assert any(n.startswith("scratch.") for n in grads_at_step)
    for name, grad in grads_at_step.items():  # the mean of the two micro-batch gradients, both students
        torch.testing.assert_close(grad, named[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    last_only = _stage(tiny_world, tmp_path / "last_only", teacher_dir, *extra)
    last_only.loss(micro[1], phase).backward()
    assert not torch.allclose(last_only.model.logit_scale.grad, named["model.logit_scale"].grad)
    set_lr(optimizer, reference.lr_schedule(16))  # the lr set at the second micro-batch's start
    set_lr(reference._scratch_optimizer, reference.lr_schedule(16))
    assert reference._scratch_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"] / 4)
    optimizer.step()
    reference._scratch_optimizer.step()

    for name, value in reference.state_dict().items():
        torch.testing.assert_close(stage.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(v, init[k]) for k, v in stage.state_dict().items() if k.startswith("model."))
    assert any(not torch.equal(v, init[k]) for k, v in stage.state_dict().items() if k.startswith("scratch."))


# ----- the cached teacher ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_cached_teacher_gives_the_online_teachers_targets_on_the_replayed_pixels(tiny_world, tmp_path,
                                                                                   teacher_dir):
    from pe_lightning.data.datamodule import as_data_config
    from pe_lightning.data.shards import expand_shards
    from pe_lightning.teachers.clip_cache import build_clip_cache, teacher_fingerprint

    cfg = _recipe(tiny_world, tmp_path, teacher_dir)
    cache = tmp_path / "cache"
    shards = expand_shards(str(Path(tiny_world) / "train"), what="test")
    build_clip_cache(shards, cache, _teacher_model(), teacher_id=teacher_fingerprint(teacher_dir / "model.pt"),
                     model="tiny", seed=cfg.seed, num_augmentations=2, augment=as_data_config(cfg.data).augment,
                     batch_size=64)
    online = _stage(tiny_world, tmp_path, teacher_dir)
    cached = _stage(tiny_world, tmp_path, teacher_dir, f"distill.cache={cache}")
    assert cached.teacher_resolution == 32 and cached.tokenizers()[1] is None
    dm = cached.datamodule()
    dm.keep_captions = True
    batch = next(iter(dm.train_dataloader()))
    assert {"teacher_image", "teacher_text"} <= set(batch)
    online_batch = {**batch, "teacher_tokens": get_tokenizer(16)(batch["caption"])}
    t_img, t_txt = online.teacher_features(online_batch)  # the online teacher on the replayed pixels
    torch.testing.assert_close(batch["teacher_image"], t_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch["teacher_text"], t_txt, rtol=1e-4, atol=1e-5)
    phase = cached.phase()
    torch.testing.assert_close(cached.loss(batch, phase), online.loss(online_batch, phase), rtol=1e-4, atol=1e-5)

    export = run_stage(_recipe(tiny_world, tmp_path / "runs", teacher_dir, f"distill.cache={cache}",
                               "callbacks=[{name: distill_eval}]"), read_pipeline())
    metrics = json.loads((export / "metrics.json").read_text())
    assert "teacher_zeroshot_top1" in metrics  # the real teacher is built for its figures at the end


# ----- the three models side by side ------------------------------------------------------------------------
@pytest.mark.slow
def test_metrics_hold_the_student_the_teacher_and_the_scratch_baseline(tiny_world, tmp_path, teacher_dir):
    from pe_lightning.data.classification import load_classification_set
    from pe_lightning.eval import build_zeroshot_classifier, zeroshot_eval

    cfg = _recipe(tiny_world, tmp_path, teacher_dir, "distill.scratch_baseline=true",
                  "callbacks=[{name: distill_eval}]")
    export = run_stage(cfg, read_pipeline())
    metrics = json.loads((export / "metrics.json").read_text())
    for key in ("zeroshot_top1", "scratch_zeroshot_top1", "teacher_zeroshot_top1", "parent_zeroshot_top1",
                "distill_gain_zeroshot_top1", "teacher_gap_zeroshot_top1"):
        assert key in metrics, key
    assert metrics["teacher_zeroshot_top1"] == metrics["parent_zeroshot_top1"]
    assert metrics["distill_gain_zeroshot_top1"] == pytest.approx(
        metrics["zeroshot_top1"] - metrics["scratch_zeroshot_top1"])
    # the teacher's figure, computed independently at its native resolution
    entry = cfg.eval.zeroshot[0]
    loader, classes, templates = load_classification_set(entry.path, cfg.data.image_size, 64)
    teacher = _teacher_model().eval()
    classifier = build_zeroshot_classifier(teacher, get_tokenizer(16), classes, templates, torch.device("cpu"))
    with torch.inference_mode():
        top1 = zeroshot_eval(teacher, loader, classifier, classes, preprocess=lambda x: resize_to(x, 32))["top1"]
    assert metrics["teacher_zeroshot_top1"] == pytest.approx(float(top1))


# ----- user errors --------------------------------------------------------------------------------------------
def test_a_missing_teacher_file_is_one_clear_error(tiny_world, tmp_path):
    cfg = _recipe(tiny_world, tmp_path, tmp_path / "nowhere" / "model.pt")
    with pytest.raises(ExportError, match=r"distill\.teacher=.*nowhere.*no such file"):
        build_stage(cfg, read_pipeline(), None)


def test_a_corrupt_teacher_file_is_one_clear_error(tiny_world, tmp_path, teacher_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text((teacher_dir / "model.json").read_text())
    (bad / "model.pt").write_bytes((teacher_dir / "model.pt").read_bytes()[:1000])  # a torn copy
    with pytest.raises(DistillTeacherError, match=r"distill teacher .*model.pt: cannot read checkpoint"):
        build_stage(_recipe(tiny_world, tmp_path, bad), read_pipeline(), None)


def test_a_bare_teacher_file_needs_its_structure_named(tiny_world, tmp_path, teacher_dir):
    bare = tmp_path / "teacher.pt"
    bare.write_bytes((teacher_dir / "model.pt").read_bytes())
    with pytest.raises(DistillTeacherError, match=r"bare weights file: name its structure with distill\.teacher_model"):
        build_stage(_recipe(tiny_world, tmp_path, bare), read_pipeline(), None)
    with pytest.raises(DistillTeacherError, match=r"is distill\.teacher_model=tiny-half its structure"):
        build_stage(_recipe(tiny_world, tmp_path, bare, "distill.teacher_model=tiny-half"), read_pipeline(), None)


def test_a_feature_term_between_unequal_widths_needs_the_projection(tiny_world, tmp_path, teacher_dir):
    with pytest.raises(DistillWidthError, match="student's image embedding is 32 wide, the teacher's 48"):
        build_stage(_recipe(tiny_world, tmp_path, teacher_dir, "distill.feature_weight=1",
                            "distill.feature_projection=false"), read_pipeline(), None)
    stage = build_stage(_recipe(tiny_world, tmp_path, teacher_dir, "distill.feature_weight=1",
                                "distill.feature_projection=true"), read_pipeline(), None)
    assert stage.distill_loss.projector.proj.weight.shape == (48, 32)
    names = [n for g in stage.configure_optimizers().param_groups for n in g["param_names"]]
    assert "projector.proj.weight" in names  # trained with the student


def test_a_teacher_resolution_above_the_loaders_is_refused(tiny_world, tmp_path, teacher_dir):
    with pytest.raises(RecipeError, match="distill.teacher_resolution=64 exceeds data.image_size=32"):
        _stage(tiny_world, tmp_path, teacher_dir, "distill.teacher_resolution=64")


def test_without_a_teacher_the_stage_says_where_to_get_one(tiny_world, tmp_path):
    cfg = load_stage_recipe("distill", tiny_run(tiny_world, tmp_path))
    stage = DistillStage(cfg)  # buildable (the recipe test builds every stage recipe without parents)
    with pytest.raises(RecipeError, match=r"make stage=video.*distill\.teacher=PATH"):
        stage.datamodule()
    with pytest.raises(PipelineError, match="needs the export of 'video' as its teacher"):
        build_stage(cfg, read_pipeline(), None)


# ----- DDP ----------------------------------------------------------------------------------------------------
RECORD = '''
import lightning as L, torch
class Record(L.Callback):
    """Saves, on each rank, the initial weights, the first batch and the first step's (all-reduced) gradients."""
    def __init__(self, out):
        self.out = out
    def on_train_start(self, trainer, pl_module):
        self.init = {k: v.clone() for k, v in pl_module.state_dict().items()}
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.batch = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save({"init": self.init, "batch": self.batch, "grads": grads},
                       f"{self.out}/rank{trainer.global_rank}.pt")
'''


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_global_batch(tiny_world, tmp_path, teacher_dir):
    """2 gloo ranks x 16 samples: the first step's gradients (student, projector, baseline) equal those of one
    process on the 32 concatenated samples (soft targets over the global batch)."""
    record = tmp_path / "record.py"
    record.write_text(RECORD)
    extra = ["distill.scratch_baseline=true", "distill.feature_weight=1", "distill.feature_projection=true",
             "train.phases=[]", "train.batch_size=32", "train.total_samples=64", "data.chunk_size=8"]
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.threads=1",
           f"callbacks=[{{name: '{record}:Record', args: {{out: '{tmp_path}'}}}}]"]
    overrides = tiny_run(tiny_world, tmp_path / "runs", f"distill.teacher={teacher_dir}", *extra, *ddp)
    result = subprocess.run([sys.executable, "-m", "pe_lightning.cli", "train", "stage=distill", *overrides],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0]["init"].items():
        assert torch.equal(value, ranks[1]["init"][key])

    one = _stage(tiny_world, tmp_path / "one", teacher_dir, *extra)
    one.load_state_dict(ranks[0]["init"])
    batch = {k: torch.cat([ranks[0]["batch"][k], ranks[1]["batch"][k]]) for k in ranks[0]["batch"]}
    assert len(batch["image"]) == 32 and not torch.equal(ranks[0]["batch"]["image"], ranks[1]["batch"]["image"])
    one.loss(batch, one.phase()).backward()
    grads = dict(one.named_parameters())
    assert ranks[0]["grads"].keys() == {n for n, p in grads.items() if p.grad is not None}
    assert any(n.startswith("scratch.") for n in ranks[0]["grads"]) and any(
        n.startswith("distill_loss.projector") for n in ranks[0]["grads"])
    for name, grad in ranks[0]["grads"].items():  # float32 sums in another order: tolerance by the tensor's scale
        ref = grads[name].grad
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6 * max(1.0, ref.abs().max().item()), msg=name)
        torch.testing.assert_close(grad, ranks[1]["grads"][name])
