"""The video stage: its loss is two CLIP losses (frame-mean clips, images), its batches count clips + images,
its knobs freeze what they say, a tiny run from a pretrain export writes the video and image figures (its own
and its parent's), a corrupt clip is skipped and counted during the stage, and two DDP processes on halves of
a mixed batch give the single-process loss and gradients."""

from __future__ import annotations

import json
import math
import tarfile

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_run
from pe_lightning.config import RecipeError
from pe_lightning.data.testing import write_tar
from pe_lightning.pipeline import StageDir, run_stage
from pe_lightning.stages import STAGES, load_stage_recipe
from pe_lightning.stages.losses import clip_loss
from pe_lightning.stages.video import VideoStage

pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")

SMALL = ["train.phases=[]", "data.chunk_size=8", "video.clip_batch_size=8", "video.image_batch_size=8"]


def _recipe(world, runs, *extra):
    return load_stage_recipe("video", tiny_run(world, runs, "callbacks=[]", *SMALL, *extra))


def _batch(stage: VideoStage, clips: int = 3, images: int = 5, frames: int = 4, seed: int = 0) -> dict:
    """A hand-built mixed batch: random frames and images, random caption tokens (no data pipeline)."""
    g = torch.Generator().manual_seed(seed)
    size, ctx = stage.cfg.data.image_size, stage.model.context_length
    vocab = stage.model.cfg.text.vocab_size

    def tokens(n):
        t = torch.randint(1, vocab - 1, (n, ctx), generator=g)
        t[:, -1] = vocab - 1  # an end token: the text tower pools at the argmax token
        return t

    return {"video": {"video": torch.randn(clips, frames, 3, size, size, generator=g), "text": tokens(clips)},
            "image": {"image": torch.randn(images, 3, size, size, generator=g), "text": tokens(images)}}


def test_registered():
    assert STAGES["video"] is VideoStage and VideoStage.roles == ("init",)


def test_loss_is_clip_of_frame_means_plus_clip_of_images(tiny_world, tmp_path):
    stage = VideoStage(_recipe(tiny_world, tmp_path, "video.video_weight=0.7", "video.image_weight=0.3"))
    stage.model.eval()  # the same function in both computations (the tiny preset has no dropout anyway)
    batch = _batch(stage)
    with torch.no_grad():
        loss = stage.loss(batch, stage.phase())
        m = stage.model
        frames = batch["video"]["video"]
        clip = m.encode_video(frames, normalize=False)  # Meta's encode_video: mean of un-normalised frames
        video_text, image_text = m.encode_text(batch["video"]["text"]), m.encode_text(batch["image"]["text"])
        images = m.encode_image(batch["image"]["image"])
        expected = 0.7 * clip_loss(clip, video_text, m.logit_scale) + 0.3 * clip_loss(images, image_text,
                                                                                        m.logit_scale)
        # the other pooling (normalise each frame, then average) gives another number: the test can tell
        per_frame = m.encode_video(frames, normalize=True)
        other = 0.7 * clip_loss(per_frame, video_text, m.logit_scale) + 0.3 * clip_loss(images, image_text,
                                                                                         m.logit_scale)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, other, rtol=1e-4, atol=1e-5)


def test_loss_by_hand_on_a_two_clip_batch(tiny_world, tmp_path):
    """An independent reference: the symmetric cross-entropy written out on 2 clips and 2 images."""
    stage = VideoStage(_recipe(tiny_world, tmp_path))
    stage.model.eval()
    batch = _batch(stage, clips=2, images=2, frames=3, seed=1)
    m = stage.model
    with torch.no_grad():
        loss = stage.loss(batch, stage.phase())
        b, n = batch["video"]["video"].shape[:2]
        per_frame = m.encode_image(batch["video"]["video"].flatten(0, 1)).view(b, n, -1)
        scale = m.logit_scale.exp()

        def symmetric_ce(x, y):
            x, y = F.normalize(sum(x[:, i] for i in range(x.shape[1])) / x.shape[1] if x.ndim == 3 else x,
                               dim=-1), F.normalize(y, dim=-1)
            s = scale * x @ y.t()
            rows = -sum(s[i, i] - torch.logsumexp(s[i], 0) for i in range(len(s))) / len(s)
            cols = -sum(s[i, i] - torch.logsumexp(s[:, i], 0) for i in range(len(s))) / len(s)
            return (rows + cols) / 2

        expected = symmetric_ce(per_frame, m.encode_text(batch["video"]["text"])) + symmetric_ce(
            m.encode_image(batch["image"]["image"]), m.encode_text(batch["image"]["text"]))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_batch_samples_count_clips_and_images(tiny_world, tmp_path):
    stage = VideoStage(_recipe(tiny_world, tmp_path))
    assert stage.batch_samples(_batch(stage, clips=3, images=5)) == 8
    assert stage.phase().batch_size == 16 and stage.phase().resolution == 32


def test_flops_per_sample_is_the_mean_over_the_step_mix(tiny_world, tmp_path):
    from pe_lightning.perf import tower_training_flops

    cfg = _recipe(tiny_world, tmp_path, "video.clip_batch_size=8", "video.image_batch_size=24")
    f = tower_training_flops(cfg.model.preset, 32, dict(cfg.model.vision), dict(cfg.model.text))
    expected = (8 * (8 * f["vision"] + f["text"]) + 24 * (f["vision"] + f["text"])) / 32
    assert VideoStage(cfg).flops_per_sample(32) == pytest.approx(expected)


def test_frozen_text_and_temperature_get_no_gradient_and_no_optimizer_slot(tiny_world, tmp_path):
    stage = VideoStage(_recipe(tiny_world, tmp_path, "video.train_text=false", "video.train_logit_scale=false",
                               "optim.compile=false"))
    stage.loss(_batch(stage), stage.phase()).backward()
    trained = {name for name, p in stage.model.named_parameters() if p.grad is not None}
    assert trained and all(name.startswith("visual.") for name in trained)
    in_optimizer = {id(p) for group in stage.configure_optimizers().param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in stage.model.named_parameters() if name.startswith("visual.")}


def test_mask_regularization_and_frame_mask_use_the_mask_token(tiny_world, tmp_path):
    stage = VideoStage(_recipe(tiny_world, tmp_path, "video.mask_reg.enabled=true", "video.frame_mask_ratio=0.5"))
    assert stage.model.visual.mask_token is not None
    stage.loss(_batch(stage), stage.phase()).backward()
    assert stage.model.visual.mask_token.grad.abs().sum() > 0
    plain = VideoStage(_recipe(tiny_world, tmp_path))
    assert plain.model.visual.mask_token is None  # off by default: the parent's structure, nothing added


def test_schedule_errors_name_the_key_and_the_fix(tiny_world, tmp_path):
    with pytest.raises(RecipeError, match="train.phases=\\[\\]"):
        VideoStage(load_stage_recipe("video", tiny_run(tiny_world, tmp_path)))  # tiny_run sets two phases
    with pytest.raises(RecipeError, match="video.clip_batch_size.*multiple of chunk size 8"):
        VideoStage(_recipe(tiny_world, tmp_path, "video.clip_batch_size=12"))


# ----- end to end from a tiny pretrain export ----------------------------------------------------------
def _shard_with_corrupt_clips(src, dst) -> int:
    """Copy a video2dataset shard, inserting after every 4th sample a clip that is not a video. Returns the
    number of corrupt clips."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(src) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    samples, bad = [], 0
    for i, sample in enumerate(members.values()):
        samples.append(sample)
        if i % 4 == 3:
            bad += 1
            samples.append({"__key__": f"{sample['__key__']}x", "mp4": b"\x00\x00\x00\x18ftypmp42 not a video",
                            "txt": b"a red circle moving up.", "json": b"{}"})
    write_tar(dst, samples)
    return bad


def _parent_export(cfg, folder):
    """A pretrain-like export (model.pt in Meta's layout + model.json) of a fresh tiny model: a parent in
    seconds, without running the pretrain stage."""
    from pe_lightning.exports import write_model_json
    from pe_lightning.models import build_model
    from pe_lightning.models.checkpoint import export_checkpoint

    torch.manual_seed(0)
    model = build_model(cfg.model.preset, vision=dict(cfg.model.vision), text=dict(cfg.model.text))
    folder.mkdir(parents=True)
    export_checkpoint(model, folder / "model.pt")
    write_model_json(model, folder)
    return folder


@pytest.fixture(scope="module")
def video_run(tiny_world, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    parent = _parent_export(load_stage_recipe("video", tiny_run(tiny_world, runs, *SMALL)), runs / "parent")
    shards = runs / "video_shards"
    bad = sum(_shard_with_corrupt_clips(p, shards / p.name) 
              for p in sorted((tiny_world / "video/train").glob("*.tar")))
    callbacks = "callbacks=[{name: checkpoint}, {name: throughput}, {name: clip_eval}, {name: video_eval}]"
    cfg = load_stage_recipe("video", tiny_run(tiny_world, runs, callbacks, *SMALL, f"init={parent}",
                                              "train.total_samples=96", "optim.warmup_samples=16",
                                              "optim.compile=false",
                                              f"data.video=[{{urls: '{shards}/{{00000..00001}}.tar', size: 32}}]"))
    export = run_stage(cfg)
    return export, json.loads((export / "metrics.json").read_text()), bad


@pytest.mark.slow  # ~30 s unloaded: two models evaluated on every image and video set
def test_tiny_run_writes_video_and_image_figures_with_the_parent_s(video_run):
    export, metrics, _ = video_run
    assert StageDir(export.parent).done.exists() and (export / "model.json").is_file()
    for key in VideoStage.headline_metrics:
        assert 0.0 <= metrics[key] <= 1.0, key
        assert 0.0 <= metrics[f"parent_{key}"] <= 1.0, key
    assert metrics["samples_seen"] == 96
    assert metrics["video_clips"] == 8 == metrics["parent_video_clips"]  # the tiny world's 8 test clips
    assert metrics["video_t2v_r1"] != metrics["parent_video_t2v_r1"] or metrics["video_v2t_r1"] != metrics[
        "parent_video_v2t_r1"] or metrics["zeroshot_top1"] != metrics["parent_zeroshot_top1"]  # it trained
    state = torch.load(export / "model.pt", weights_only=True)
    assert "visual.mask_token" not in state and "logit_scale" in state  # a PE-Core file in Meta's layout


@pytest.mark.slow
def test_corrupt_clips_are_skipped_and_counted_during_the_stage(video_run):
    _, metrics, bad = video_run
    assert bad >= 2
    skipped = {k: v for k, v in metrics.items() if k.startswith("skipped_")}
    # 6 steps x 8 clips = 48 good clips, more than the 32 of one pass: corrupt clips are met
    assert set(skipped) == {"skipped_video_bad_video"} and skipped["skipped_video_bad_video"] >= 1
    assert metrics["data_skipped"] == skipped["skipped_video_bad_video"]


# ----- DDP: two processes on the halves of a mixed batch = one process on all of it ---------------------
def _ddp_worker(rank: int, world: int, init_file: str, recipe_yaml: str, out: str) -> None:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = OmegaConf.create(recipe_yaml)
    torch.manual_seed(0)
    stage = VideoStage(cfg)
    batch = _batch(stage, clips=4, images=6, frames=3, seed=7)
    half = {part: {k: v.chunk(world)[rank] for k, v in batch[part].items()} for part in batch}
    loss = stage.loss(half, stage.phase())
    loss.backward()
    grads = {}
    for name, p in stage.model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)  # what DDP does: the mean of the ranks' gradients
        grads[name] = g / world
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_on_the_mixed_batch(tiny_world, tmp_path):
    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    cfg = _recipe(tiny_world, tmp_path)
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), OmegaConf.to_yaml(cfg), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    stage = VideoStage(cfg)
    loss = stage.loss(_batch(stage, clips=4, images=6, frames=3, seed=7), stage.phase())
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in stage.model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(ddp["grads"][name], p.grad, rtol=1e-4, atol=1e-5, msg=name)  # fp32 sums
    assert math.isfinite(float(loss))


RECORD_SHAPES = '''
import json, lightning as L
class RecordShapes(L.Callback):
    def __init__(self, out):
        self.out, self.rows = out, []
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append([batch["video"]["video"].shape[0], batch["image"]["image"].shape[0]])
    def on_train_end(self, trainer, pl_module):
        skipped = trainer.datamodule.skipped()
        open(f"{self.out}.{trainer.global_rank}", "w").write(json.dumps({"rows": self.rows, "skipped": skipped}))
'''


@pytest.mark.slow
def test_ddp_through_the_cli_splits_both_batches_over_the_ranks(tiny_world, tmp_path):
    """`trainer.strategy=ddp trainer.devices=2` on CPU (gloo), as a user launches it: each rank gets half the
    clips and half the images, the stage finishes with the global count, and skips are summed over ranks."""
    import subprocess
    import sys

    recorder = tmp_path / "record.py"
    recorder.write_text(RECORD_SHAPES)
    parent = _parent_export(_recipe(tiny_world, tmp_path), tmp_path / "parent")
    shards = tmp_path / "video_shards"
    for p in sorted((tiny_world / "video/train").glob("*.tar")):
        _shard_with_corrupt_clips(p, shards / p.name)
    overrides = tiny_run(tiny_world, tmp_path / "runs", *SMALL, f"init={parent}", "train.total_samples=64",
                         f"data.video=[{{urls: '{shards}/{{00000..00001}}.tar', size: 32}}]",
                         "video.clip_batch_size=16", "video.image_batch_size=16", "optim.compile=false",
                         "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.threads=1",
                         f"callbacks=[{{name: '{recorder}', args: {{out: '{tmp_path / 'rows'}'}}}}]")
    result = subprocess.run([sys.executable, "-m", "pe_lightning.cli", "train", "stage=video", *overrides],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rows.{rank}").read_text()) for rank in (0, 1)]
    assert [r["rows"] for r in ranks] == [[[8, 8], [8, 8]]] * 2
    metrics = json.loads((tmp_path / "runs" / "t" / "video" / "export" / "metrics.json").read_text())
    assert metrics["samples_seen"] == 64
    per_rank = [r["skipped"].get("video/bad_video", 0) for r in ranks]
    assert sum(per_rank) >= 1 and metrics["skipped_video_bad_video"] == sum(per_rank)


# ----- WiSE-FT: the blend with the parent, once, at the end ----------------------------------------------
STOP_AT_THE_LAST_STEP = '''
import lightning as L
class StopAt(L.Callback):
    """A kill right after the final step's checkpoint, before the stage finishes (blends) and exports."""
    def __init__(self, steps):
        self.steps = steps
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.steps:
            raise RuntimeError("killed")
'''


@pytest.mark.slow  # ~20 s: three short runs
def test_parent_blend_is_the_lerp_to_the_parent_once_even_across_a_kill_after_the_last_step(tiny_world, tmp_path):
    parent = _parent_export(_recipe(tiny_world, tmp_path), tmp_path / "parent")
    stopper = tmp_path / "stop.py"
    stopper.write_text(STOP_AT_THE_LAST_STEP)

    def run(name, *extra):
        cfg = load_stage_recipe("video", tiny_run(tiny_world, tmp_path / name, "callbacks=[{name: checkpoint}]",
                                                  *SMALL, f"init={parent}", "train.total_samples=48",
                                                  "optim.warmup_samples=16", "optim.compile=false", *extra))
        return run_stage(cfg)

    def weights(export):
        return torch.load(export / "model.pt", weights_only=True)

    plain = weights(run("plain", "video.parent_blend=0"))  # the tiny layer blends by default
    blended = run("blended", "video.parent_blend=0.25")
    original = weights(parent)
    for key, value in weights(blended).items():
        torch.testing.assert_close(value, torch.lerp(plain[key], original[key], 0.25), msg=key)
    assert json.loads((blended / "metrics.json").read_text())["parent_blend"] == 0.25

    kill = f"callbacks=[{{name: checkpoint}}, {{name: '{stopper}:StopAt', args: {{steps: 3}}}}]"
    with pytest.raises(RuntimeError, match="killed"):
        run("killed", "video.parent_blend=0.25", kill)
    resumed = weights(run("killed", "video.parent_blend=0.25"))  # resumes at the end: blends once, trains nothing
    for key, value in weights(blended).items():
        assert torch.equal(resumed[key], value), key


def test_parent_blend_outside_0_1_or_without_a_parent_is_a_recipe_error(tiny_world, tmp_path):
    stage = VideoStage(_recipe(tiny_world, tmp_path, "video.parent_blend=0.3"))
    with pytest.raises(RecipeError, match="needs the init parent"):
        stage.finish_training()
    with pytest.raises(RecipeError, match="fraction"):  # at construction, before any training
        VideoStage(_recipe(tiny_world, tmp_path, "video.parent_blend=1.5"))


def test_the_model_is_the_parent_exports_structure_not_the_recipes_preset(tiny_world, tmp_path):
    """A parent trained with another stem (model.vision.stem=patch in pretrain) is rebuilt from its export's
    model.json; the video recipe's own preset (tiny: the conv stem) would miss its keys."""
    from pe_lightning.exports import Export
    from pe_lightning.models import build_model
    from pe_lightning.models.checkpoint import export_checkpoint
    from pe_lightning.exports import write_model_json

    recipe = _recipe(tiny_world, tmp_path)
    parent = build_model("tiny", vision={**recipe.model.vision, "stem": "patch"}, text=dict(recipe.model.text))
    export = tmp_path / "export"
    export.mkdir()
    export_checkpoint(parent, export / "model.pt")
    write_model_json(parent, export)
    stage = VideoStage(recipe, parents={"init": Export.at(export)})
    assert stage.model.visual.cfg.stem == "patch" and recipe.model.vision.get("stem", "conv") != "patch"
    for name, tensor in parent.state_dict().items():
        assert torch.equal(stage.model.state_dict()[name], tensor), name
    resumed = VideoStage(recipe, parents={"init": Export.at(export)}, fresh=False)  # a resume: same structure
    assert resumed.model.visual.cfg.stem == "patch"


def test_a_resumed_stage_still_carries_its_parents_mask_token(tiny_world, tmp_path):
    """Video (mask_reg off) has no mask token of its own and passes its parent's on to its export's side file.
    That token is a plain attribute in no state dict: the checkpoint carries it, so a stage resumed from the
    checkpoint (which never reloads its parent) exports the same side file as an uninterrupted one."""
    from pe_lightning.exports import Export, write_model_json
    from pe_lightning.models import build_model
    from pe_lightning.models.checkpoint import export_checkpoint, read_mask_token

    recipe = _recipe(tiny_world, tmp_path)
    assert not recipe.video.mask_reg.enabled
    torch.manual_seed(5)
    parent = build_model("tiny", vision={**recipe.model.vision, "use_mask_token": True}, text=dict(recipe.model.text))
    export = tmp_path / "export"
    export.mkdir()
    export_checkpoint(parent, export / "model.pt")
    write_model_json(parent, export)
    stage = VideoStage(recipe, parents={"init": Export.at(export)})
    checkpoint: dict = {}
    stage.on_save_checkpoint(checkpoint)
    resumed = VideoStage(recipe, parents={"init": Export.at(export)}, fresh=False)
    resumed.on_load_checkpoint(checkpoint)
    for name, stage_ in (("fresh", stage), ("resumed", resumed)):
        export_checkpoint(stage_.model, tmp_path / name / "model.pt")
        token = read_mask_token(tmp_path / name / "model.pt")
        assert token is not None, name
        torch.testing.assert_close(token, parent.visual.mask_token.detach())
