"""The spatial stage (PE-Spatial): its loss is the two dense losses composed, its student is the parent's vision
tower without a head, its teacher a frozen copy cut at layer k, its data carry the cached teacher target (built
when missing, a clear error when broken), and it trains, exports a head-less file that reloads, and resumes
exactly; two DDP processes train as one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import stop_after, tiny_run
from pe_lightning.config import RecipeError
from pe_lightning.data.dense import DenseDataModule, patch_mask_for
from pe_lightning.data.shards import DataError
from pe_lightning.data.transforms import eval_transform
from pe_lightning.exports import Export, write_model_json
from pe_lightning.models import build_model
from pe_lightning.models.checkpoint import export_checkpoint
from pe_lightning.pipeline import PipelineError, StageDir, run_stage
from pe_lightning.stages import load_stage_recipe
from pe_lightning.stages.dense_losses import gram_mse_loss
from pe_lightning.stages.spatial import SpatialStage, default_teacher_layer, spatial_layer_scale
from pe_lightning.teachers.cache import TeacherCache

# the test model of conftest.TINY_MODEL (2 blocks, width 64, 32 px, patch 8: a 4 x 4 token grid)
VISION = dict(width=64, layers=2, heads=2, mlp_dim=128, output_dim=32, image_size=32)
TEXT = dict(width=64, layers=1, heads=2, mlp_dim=128, output_dim=32)
ONE_PHASE = "train.phases=[{until_samples: 192, resolution: 32, batch_size: 16}]"


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A PE-Core-layout export of the test model (random weights, model.json): the init and teacher parent."""
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("parent")
    model = build_model("tiny", vision=VISION, text=TEXT)
    export_checkpoint(model, out / "model.pt")
    write_model_json(model, out)
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache") / "oracle"


def _cfg(world, runs, parent, cache, *extra):
    """The recipe with `parent` as init and teacher given on the command line (parent=None: the pipeline's)."""
    given = [f"init={parent}", f"spatial.teacher={parent}"] if parent is not None else []
    return load_stage_recipe("spatial", tiny_run(world, runs, *given, f"spatial.cache_dir={cache}", ONE_PHASE,
                                                 *extra))


PIPELINE = {"pretrain": {}, "spatial": {"init": "pretrain", "teacher": "pretrain"}}


def _finished_parent(runs: Path, parent: Path) -> None:
    """`parent` as the finished pretrain stage of run `t` (its export/ and DONE), as the pipeline finds it."""
    sdir = StageDir(runs / "t" / "pretrain")
    shutil.copytree(parent, sdir.export)
    sdir.done.write_text("{}\n")


def _stage(world, tmp_path, parent, cache, *extra) -> SpatialStage:
    cfg = _cfg(world, tmp_path, parent, cache, *extra)
    export = Export.at(parent)
    return SpatialStage(cfg, parents={"init": export, "teacher": export})


def _batch(b=3, grid=4, dim=24, ratio=0.75):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(b, 3, 32, 32, generator=g),
            "patch_mask": torch.stack([patch_mask_for(0, i, grid * grid, ratio) for i in range(b)]),
            "target": torch.randn(b, grid * grid, dim, generator=g)}


# ----- the loss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distill_tokens,sam_tokens,class_token", [
    ("all", "all", "ignore"), ("masked", "visible", "ignore"), ("visible", "all", "self_distill")])
def test_loss_is_the_two_losses_composed_by_hand(tiny_world, tmp_path, parent, cache_dir, distill_tokens,
                                                 sam_tokens, class_token):
    stage = _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.drop_path=0", "spatial.self_distill_weight=0.7",
                   "spatial.sam_weight=2.5", f"spatial.self_distill_tokens={distill_tokens}",
                   f"spatial.sam_tokens={sam_tokens}", f"spatial.class_token={class_token}")
    batch = _batch()
    loss = stage.loss(batch, stage.phase())

    # by hand: the student's tokens of the masked image, the parent's layer-k tokens of the clean image through
    # an independent path (the whole parent's forward_intermediates), the negative cosine and the Gram MSE
    mask = batch["patch_mask"]
    student = stage.model.visual.forward_features(batch["image"], mask=mask)
    k = default_teacher_layer(2)
    full = Export.at(parent).build_model().visual
    patches, cls = full.forward_intermediates(batch["image"], indices=[k - 1], output_fmt="NLC",
                                              intermediates_only=True, return_prefix_tokens=True)[0]
    teacher = torch.cat([cls, patches], dim=1)
    pick = {"all": torch.ones_like(mask), "masked": mask, "visible": ~mask}
    cos = F.cosine_similarity(student, teacher, dim=-1)  # [B, 1 + N]
    weight = torch.cat([torch.full_like(mask[:, :1], class_token == "self_distill"), pick[distill_tokens]], 1)
    expected_self = -(cos * weight).sum() / weight.sum()
    expected_sam = gram_mse_loss(student[:, 1:], batch["target"], tokens=pick[sam_tokens])
    torch.testing.assert_close(loss, 0.7 * expected_self + 2.5 * expected_sam)


def test_gram_term_by_hand_on_an_unmasked_image(tiny_world, tmp_path, parent, cache_dir):
    """sam_weight only, no mask: the loss is the mean squared difference of the two cosine Gram matrices."""
    stage = _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.drop_path=0", "spatial.mask_ratio=0",
                   "spatial.self_distill_weight=0")
    batch = _batch(b=2, ratio=0.0)
    loss = stage.loss(batch, stage.phase())
    s = F.normalize(stage.model.visual.forward_features(batch["image"])[:, 1:], dim=-1)
    t = F.normalize(batch["target"], dim=-1)
    expected = ((s @ s.transpose(1, 2) - t @ t.transpose(1, 2)) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_a_larger_teacher_resolution_is_area_pooled_and_the_standardised_space_by_hand(tiny_world, tmp_path, parent,
                                                                                       cache_dir):
    """teacher_resolution 64 (2x the student's 32): the teacher's 8 x 8 layer-k map is averaged over 2 x 2 blocks
    onto the student's 4 x 4 grid; self_distill_space=standardised: the cosine is taken after both token sets are
    moved into the teacher batch's per-channel standard coordinates."""
    stage = _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.drop_path=0", "spatial.mask_ratio=0",
                   "spatial.sam_weight=0", "spatial.teacher_resolution=64", "spatial.self_distill_space=standardised")
    batch = _batch(b=2, ratio=0.0)
    loss = stage.loss(batch, stage.phase())

    big = F.interpolate(batch["image"], size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    full = Export.at(parent).build_model().visual
    fine = full.forward_intermediates(big, indices=[default_teacher_layer(2) - 1], output_fmt="NCHW",
                                      intermediates_only=True)[0]  # [B, W, 8, 8]
    teacher = F.avg_pool2d(fine, 2).flatten(2).transpose(1, 2)  # [B, 16, W]
    student = stage.model.visual.forward_features(batch["image"])[:, 1:]
    flat = teacher.flatten(0, 1)
    mu, sigma = flat.mean(0), flat.std(0)
    expected = -F.cosine_similarity((student - mu) / sigma, (teacher - mu) / sigma, dim=-1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(RecipeError, match="teacher_resolution=60"):
        _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.teacher_resolution=60").teacher_resolution
    with pytest.raises(RecipeError, match="self_distill_space"):
        _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.self_distill_space=whitened")


# ----- student and teacher --------------------------------------------------------------------------------
def test_student_is_the_parents_vision_tower_without_head(tiny_world, tmp_path, parent, cache_dir):
    stage = _stage(tiny_world, tmp_path, parent, cache_dir)
    student = stage.model
    assert student.vision_only and student.logit_scale is None
    v = student.visual
    assert v.ln_post is None and v.attn_pool is None and v.proj is None and v.mask_token is not None
    assert v.cfg.drop_path == 0.1 and v.cfg.ls_init_value is None  # tiny: no LayerScale (as small PE-Spatial)
    assert all(type(b.drop_path).__name__ == "DropPath" for b in v.transformer.resblocks)
    parent_visual = Export.at(parent).build_model().visual.state_dict()
    mine = v.state_dict()
    assert set(mine) - set(parent_visual) == {"mask_token"}
    assert {k.split(".")[0] for k in set(parent_visual) - set(mine)} == {"ln_post", "attn_pool", "proj"}
    for key in set(mine) & set(parent_visual):
        assert torch.equal(mine[key], parent_visual[key]), key


def test_layer_scale_only_where_the_pe_spatial_model_of_the_size_has_it():
    assert spatial_layer_scale("PE-Core-G14-448") == 0.1  # PE-Spatial-G
    assert spatial_layer_scale("PE-Spatial-G14-448") == 0.1
    assert spatial_layer_scale("PE-Core-L14-336") is None and spatial_layer_scale("PE-Core-B16-224") is None
    assert spatial_layer_scale("tiny") is None


def test_teacher_layer_scales_the_papers_41_of_50():
    assert [default_teacher_layer(d) for d in (50, 24, 12, 4, 2, 1)] == [41, 20, 10, 3, 2, 1]


def test_teacher_is_a_frozen_copy_cut_at_layer_k(tiny_world, tmp_path, parent, cache_dir):
    stage = _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.teacher_layer=1")
    teacher = stage.teacher
    assert teacher.layers == 1 and teacher.ln_post is None and teacher.attn_pool is None
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any("teacher" in k or k.startswith("_frozen") for k in stage.state_dict())
    images = torch.randn(2, 3, 32, 32)
    full = Export.at(parent).build_model().visual
    patches = full.forward_intermediates(images, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(teacher.forward_features(images)[:, 1:], patches)
    stage.train()
    assert not teacher.training


def test_recipe_errors_name_the_key(tiny_world, tmp_path, parent, cache_dir):
    with pytest.raises(RecipeError, match="one resolution"):
        _stage(tiny_world, tmp_path, parent, cache_dir, "train.phases=[{until_samples: 64, resolution: 16, "
               "batch_size: 32}, {until_samples: 192, resolution: 32, batch_size: 16}]")
    with pytest.raises(RecipeError, match="spatial.sam_tokens"):
        _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.sam_tokens=some")
    with pytest.raises(RecipeError, match="mask_ratio > 0"):
        _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.mask_ratio=0", "spatial.self_distill_tokens=masked")
    with pytest.raises(RecipeError, match="teacher_layer"):
        _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.teacher_layer=5")


# ----- data and cache -------------------------------------------------------------------------------------
def _datamodule(world, cache, **kw) -> DenseDataModule:
    data = OmegaConf.to_container(load_stage_recipe("spatial", tiny_run(world, "runs")).data, resolve=True)
    data["augment"].update(brightness=0.0, saturation=0.0, hflip=0.5)
    kw.setdefault("tokens", 4)
    return DenseDataModule(data, cache_dir=cache, mask_ratio=0.75, seed=0, batch_size=16, **kw)


def test_missing_cache_is_built_and_batches_carry_the_flipped_target(tiny_world, tmp_path):
    cache = tmp_path / "cache"
    dm = _datamodule(tiny_world, cache)
    dm.setup()
    assert json.loads((cache / "index.json").read_text())["complete"]
    batch = next(iter(dm.train_dataloader()))
    keys, flips = batch["key"], batch["flip"]
    assert len(set(keys)) == 16 and flips.any() and not flips.all()
    reader = TeacherCache(cache)
    assert reader.tokens == 4
    torch.testing.assert_close(batch["target"], reader.lookup(keys, flip=flips.tolist()))
    assert batch["patch_mask"].shape == (16, 16) and (batch["patch_mask"].sum(1) == 12).all()  # round(.75 * 16)
    # the image is the whole scene (no crop), mirrored where flipped: the pixels the target belongs to
    from pe_lightning.data.shards import iter_tar_samples
    from pe_lightning.data.image_text import decode_image

    raw = {r["__key__"]: r for shard in sorted((tiny_world / "train").glob("*.tar"))
           for r in iter_tar_samples(str(shard), lambda *_: None) if r["__key__"] in keys}
    for i, key in enumerate(keys):
        clean = eval_transform(decode_image(raw[key]), 32)
        torch.testing.assert_close(batch["image"][i], clean.flip(-1) if flips[i] else clean)


def test_an_interrupted_cache_build_resumes(tiny_world, tmp_path):
    cache = tmp_path / "cache"
    dm = _datamodule(tiny_world, cache)
    dm.setup()
    (cache / "index.json").unlink()  # as if killed before the end: the finished shards are kept
    first = sorted(cache.glob("*.tar"))[0]
    stamp = first.stat().st_mtime_ns
    _datamodule(tiny_world, cache).setup()
    assert first.stat().st_mtime_ns == stamp and json.loads((cache / "index.json").read_text())["complete"]


def test_a_truncated_or_missing_cache_shard_is_a_clear_error(tiny_world, tmp_path):
    cache = tmp_path / "cache"
    _datamodule(tiny_world, cache).setup()
    shard = sorted(cache.glob("*.tar"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{shard}.*truncated"):
        _datamodule(tiny_world, cache).setup()
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard}.*missing"):
        _datamodule(tiny_world, cache).setup()


def test_cache_errors_name_the_fix(tiny_world, tmp_path):
    with pytest.raises(DataError, match="pe-lightning teacher sam"):  # SAM 2.1 caches are never built here
        _datamodule(tiny_world, tmp_path / "sam", teacher="sam2").setup()
    _datamodule(tiny_world, tmp_path / "c").setup()
    with pytest.raises(DataError, match="4x4 token grid, the student's is 8x8"):
        _datamodule(tiny_world, tmp_path / "c", tokens=8).setup()
    dm = _datamodule(tiny_world, tmp_path / "crop")
    dm.cfg.augment.crop_scale_min = 0.8
    with pytest.raises(DataError, match="without random crops"):
        dm.setup()


# ----- end to end -----------------------------------------------------------------------------------------
def _weights(export: Path) -> dict:
    return torch.load(export / "model.pt", weights_only=True)


@pytest.mark.slow
def test_trains_exports_a_headless_file_and_resumes_exactly(tiny_world, tmp_path, parent, monkeypatch):
    builds = []
    original = SpatialStage.build_teacher
    monkeypatch.setattr(SpatialStage, "build_teacher", lambda self, p: builds.append(p) or original(self, p))
    cache = tmp_path / "cache"  # missing: the stage builds it
    evals = "callbacks=[{name: checkpoint}, {name: dense_eval}, {name: clip_eval}]"
    for runs in ("ref", "parts"):
        _finished_parent(tmp_path / runs, parent)
    reference = run_stage(_cfg(tiny_world, tmp_path / "ref", None, cache, evals), PIPELINE)
    assert (cache / "index.json").is_file() and len(builds) == 1

    stop = f"callbacks=[{{name: checkpoint}}, {stop_after(tmp_path)}]"
    with pytest.raises(PipelineError, match="run the same command again to resume"):
        run_stage(_cfg(tiny_world, tmp_path / "parts", None, cache, stop), PIPELINE)
    resumed = run_stage(_cfg(tiny_world, tmp_path / "parts", None, cache, evals), PIPELINE)
    assert len(builds) == 3  # the teacher is rebuilt on resume
    ckpt = torch.load(StageDir(tmp_path / "parts" / "t" / "spatial").checkpoint, weights_only=False)
    assert all(k.startswith("model.visual.") for k in ckpt["state_dict"])  # no teacher, no text tower

    a, b = _weights(reference), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a PE-Spatial file: vision keys only, no head, no mask token; it reloads as a vision-only model
    assert all(k.startswith("visual.") for k in a)
    assert not any(k.split(".")[1] in ("ln_post", "attn_pool", "proj", "mask_token") for k in a)
    model = Export.at(reference).build_model()
    assert model.vision_only and model.visual.attn_pool is None and model.visual.cfg.drop_path == 0.0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in a.items())
    parent_weights = _weights(parent)
    assert any(not torch.equal(a[k], parent_weights[k]) for k in a)  # it trained

    metrics = json.loads((reference / "metrics.json").read_text())
    for key in SpatialStage.headline_metrics + ("parent_dense_curve", "dense_miou_gain"):
        assert key in metrics, key
    assert [c["layer"] for c in metrics["parent_dense_curve"]] == [1, 2]
    assert metrics["parent_dense_miou_best"] == max(c["score"] for c in metrics["parent_dense_curve"])
    assert 0.0 <= metrics["dense_miou"] <= 1.0 and metrics["samples_seen"] == 192


@pytest.mark.slow
def test_two_ddp_processes_train_as_one(tiny_world, tmp_path, parent):
    """world 1 x 2 reader streams and world 2 x 1 stream read the same global batches (the streams are global
    slots). Flips and patch masks are drawn per global sample index, which depends on the rank layout, and
    DropPath per rank, so this check runs without them; the losses are per-image / per-token means, so the
    average of the two ranks' gradients is the one-process gradient of the whole batch."""
    common = [f"data.root={tiny_world}", "data.generate=false", "data.image_size=32", "data.workers=1",
              "run=t", "data.chunk_size=8", "data.augment.enabled=false", "spatial.mask_ratio=0",
              "spatial.drop_path=0", "train.total_samples=96", "optim.warmup_samples=16",
              "train.phases=[{until_samples: 96, resolution: 32, batch_size: 16}]", "trainer.progress_bar=false",
              "callbacks=[{name: checkpoint}]", "trainer.accelerator=cpu", "trainer.threads=1", f"init={parent}",
              f"spatial.teacher={parent}", f"spatial.cache_dir={tmp_path / 'cache'}",
              *[f"model.vision.{k}={v}" for k, v in VISION.items()], *[f"model.text.{k}={v}" for k, v in TEXT.items()]]

    def run(runs, *extra):
        done = subprocess.run([sys.executable, "-m", "pe_lightning.cli", "train", "stage=spatial", f"runs_dir={runs}",
                               *common, *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return _weights(runs / "t" / "spatial" / "export")

    one = run(tmp_path / "one", "data.streams=2", "trainer.devices=1")
    two = run(tmp_path / "two", "data.streams=1", "trainer.devices=2", "trainer.strategy=ddp")
    assert one.keys() == two.keys()
    start = _weights(parent)
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # it trained: the check has teeth
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)


# ----- #29: locality target, teacher layer, masking, optimiser ---------------------------------------------
def test_centre_tokens_and_remove_negative_reach_the_gram_term(tiny_world, tmp_path, parent, cache_dir):
    batch = _batch(b=2, ratio=0.0)
    keys = ("spatial.drop_path=0", "spatial.mask_ratio=0", "spatial.self_distill_weight=0")
    for extra, centre, neg in ((("spatial.centre_tokens=true",), True, False),
                               (("spatial.remove_negative=true",), False, True),
                               ((), False, False)):
        stage = _stage(tiny_world, tmp_path, parent, cache_dir, *keys, *extra)
        loss = stage.loss(batch, stage.phase())
        s = stage.model.visual.forward_features(batch["image"])[:, 1:]
        t = batch["target"]
        if centre:
            s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        gs, gt = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
        if neg:
            gs, gt = gs.clamp_min(0), gt.clamp_min(0)
        torch.testing.assert_close(loss, ((gs - gt) ** 2).mean())
    assert stage.args.centre_tokens is False and stage.args.remove_negative is False  # defaults: today's loss


def test_graded_oracle_keys_choose_their_own_cache(tiny_world, tmp_path, parent, cache_dir):
    stage = _stage(tiny_world, tmp_path, parent, "null", "spatial.oracle.kind=graded", "spatial.oracle.radius=0.3")
    assert stage.cache_dir().name == "oracle-graded-c0.1-r0.3-g32-t4-d128"
    dm = stage.datamodule()
    assert dm.oracle == {"kind": "graded", "clip": 0.1, "radius": 0.3}
    assert _stage(tiny_world, tmp_path, parent, "null").cache_dir().name == "oracle-g32-t4-d128"  # as before
    with pytest.raises(RecipeError, match="spatial.oracle.kind"):
        _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.oracle.kind=soft")
    # the datamodule builds the graded cache with the graded teacher's arguments
    cache = tmp_path / "graded"
    _datamodule(tiny_world, cache, grid=4, oracle={"kind": "graded", "clip": 0.1, "radius": 0.3}).setup()
    settings = json.loads((cache / "cache.json").read_text())["settings"]
    assert settings["teacher_args"] == {"grid": 4, "magnitude": 10.0, "kind": "graded", "clip": 0.1, "radius": 0.3}
    assert json.loads((cache / "index.json").read_text())["target_effective_rank"]["mean"] > 1.0


def test_teacher_layer_auto_is_the_argmax_of_the_parents_dense_curve(tiny_world, tmp_path, parent, cache_dir,
                                                                      monkeypatch):
    import pe_lightning.eval.dense_curve as dc

    calls = []

    def fake_curve(visual, set_dir, layers, image_size, batch_size, device, max_iter):
        calls.append((visual.layers, Path(set_dir), list(layers), image_size))
        return {1: {"miou": 0.3, "class_iou": []}, 2: {"miou": 0.2, "class_iou": []}}

    monkeypatch.setattr(dc, "dense_curve", fake_curve)
    stage = _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.teacher_layer=auto")
    assert stage.teacher_layer == 1 and stage.teacher.layers == 1  # layer 1 wins, not round(41/50 * 2) = 2
    assert calls == [(2, tiny_world / "zeroshot" / "test", [1, 2], 32)]  # the full parent at the stage's resolution
    assert stage.metrics["teacher_layer"] == 1 and stage.metrics["teacher_layer_rule"] == "auto"
    assert stage.metrics["teacher_layer_curve"] == [{"layer": 1, "score": 0.3}, {"layer": 2, "score": 0.2}]
    # an explicit layer still works and is recorded; the default (0) keeps the paper's ratio
    assert _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.teacher_layer=2").metrics["teacher_layer"] == 2
    assert _stage(tiny_world, tmp_path, parent, cache_dir).teacher_layer == default_teacher_layer(2)
    assert len(calls) == 1
    with pytest.raises(RecipeError, match="teacher_layer"):
        _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.teacher_layer=best")
    # the end-of-stage evaluation reuses the curve measured at the start (same parent, set, resolution, probe)
    from callbacks.dense_eval import DenseEval

    cb = DenseEval(stage.cfg)
    assert cb.set_dir == tiny_world / "zeroshot" / "test"
    assert stage.parent_curve_memo["key"] == (str(cb.set_dir), 32, cb.max_iter, str(Export.at(parent).weights))


def test_teacher_layer_auto_runs_the_real_probe(tiny_world, tmp_path, parent, cache_dir):
    stage = _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.teacher_layer=auto")
    curve = stage.metrics["teacher_layer_curve"]
    scores = [c["score"] for c in curve]
    assert [c["layer"] for c in curve] == [1, 2] and all(0 <= s <= 1 for s in scores)
    assert stage.teacher_layer == 1 + max(range(2), key=lambda i: (scores[i], -i))


def test_the_mask_token_travels_through_exports_in_a_side_file(tiny_world, tmp_path, parent, cache_dir):
    from pe_lightning.models import load_checkpoint
    from pe_lightning.models.checkpoint import mask_token_path, read_mask_token

    torch.manual_seed(3)
    masked = build_model("tiny", vision={**VISION, "use_mask_token": True}, text=TEXT)
    folder = tmp_path / "masked_parent"
    folder.mkdir()
    export_checkpoint(masked, folder / "model.pt")
    write_model_json(masked, folder)
    side = folder / "model.mask_token.pt"
    assert mask_token_path(folder / "model.pt") == side and side.is_file()
    assert "visual.mask_token" not in torch.load(folder / "model.pt", weights_only=True)  # Meta's keys only
    torch.testing.assert_close(read_mask_token(folder / "model.pt"), masked.visual.mask_token.detach())
    # a stage that never masks (video with mask_reg off) carries it to its own export
    plain = build_model("tiny", vision=VISION, text=TEXT)
    report = load_checkpoint(plain, folder / "model.pt")
    assert report.mask_token_file == str(side)
    export_checkpoint(plain, tmp_path / "carried" / "model.pt")
    torch.testing.assert_close(read_mask_token(tmp_path / "carried" / "model.pt"), masked.visual.mask_token.detach())
    # spatial.mask_token=parent: the student starts from it; the default (fresh) draws a new one
    export = Export.at(folder)
    cfg = _cfg(tiny_world, tmp_path, folder, cache_dir, "spatial.mask_token=parent")
    student = SpatialStage(cfg, parents={"init": export, "teacher": export}).model.visual
    torch.testing.assert_close(student.mask_token.detach(), masked.visual.mask_token.detach())
    fresh = SpatialStage(_cfg(tiny_world, tmp_path, folder, cache_dir),
                         parents={"init": export, "teacher": export}).model.visual
    assert not torch.equal(fresh.mask_token.detach(), masked.visual.mask_token.detach())
    # a parent without the side file is a clear error for mask_token=parent
    with pytest.raises(RecipeError, match="mask-token side file"):
        _stage(tiny_world, tmp_path, parent, cache_dir, "spatial.mask_token=parent")
    # the student's own export writes its token beside its Meta-layout file
    stage = SpatialStage(cfg, parents={"init": export, "teacher": export})
    out = tmp_path / "spatial_export"
    out.mkdir()
    stage.export(out)
    assert "visual.mask_token" not in torch.load(out / "model.pt", weights_only=True)
    torch.testing.assert_close(read_mask_token(out / "model.pt"), stage.model.visual.mask_token.detach())


def test_no_decay_lr_scale_reaches_the_spatial_optimiser(tiny_world, tmp_path, parent, cache_dir):
    def groups(*extra):
        stage = _stage(tiny_world, tmp_path, parent, cache_dir, "optim.name=lamb", *extra)
        opt = stage.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt[0] if isinstance(opt, (list, tuple)) else opt
        return {g.get("group_name"): g.get("lr_scale", 1.0) for g in opt.param_groups}

    assert groups()["no_decay"] == 1.0  # the default: today's optimiser
    assert groups("optim.no_decay_lr_scale=0.1667")["no_decay"] == pytest.approx(0.1667)
