"""The pretrain stage end to end on a tiny model: export, metrics, phases, learning."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_run
from pe_lightning.stages import load_stage_recipe
from pe_lightning.models import build_model
from pe_lightning.models.checkpoint import load_checkpoint
from pe_lightning.pipeline import StageDir, run_stage

RECORDER = '''
import json, lightning as L
class Recorder(L.Callback):
    def __init__(self, out):
        self.out = out
        self.rows = []
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append([pl_module.samples_seen, pl_module.phase().resolution, batch["image"].shape[0]])
    def on_train_end(self, trainer, pl_module):
        open(self.out, "w").write(json.dumps(self.rows))
'''


@pytest.fixture(scope="module")
def finished_run(tiny_world, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    recorder = runs / "recorder.py"
    recorder.write_text(RECORDER)
    callbacks = ("callbacks=[{name: checkpoint}, {name: throughput}, {name: clip_eval}, "
                 f"{{name: '{recorder}:Recorder', args: {{out: '{runs / 'steps.json'}'}}}}]")
    cfg = load_stage_recipe("pretrain", tiny_run(tiny_world, runs, callbacks))
    export = run_stage(cfg)
    return cfg, StageDir(runs / "t" / "pretrain"), export, json.loads((runs / "steps.json").read_text())


def test_export_is_complete_and_loads(finished_run):
    cfg, sdir, export, _ = finished_run
    assert export == sdir.export and sdir.done.exists()
    assert {"model.pt", "config.yaml", "metrics.json"} <= {p.name for p in export.iterdir()}
    model = build_model(cfg.model.preset, vision=dict(cfg.model.vision), text=dict(cfg.model.text))
    report = load_checkpoint(model, export / "model.pt")
    assert report.format == "meta" and not report.missing
    state = torch.load(export / "model.pt", weights_only=True)
    assert "visual.mask_token" not in state  # Meta's layout: the training-only mask token stays out


def test_metrics_have_the_headline_keys(finished_run):
    _, _, export, _ = finished_run
    metrics = json.loads((export / "metrics.json").read_text())
    for key in ("zeroshot_top1", "zeroshot_heldout_top1", "retrieval_i2t_r1", "retrieval_t2i_r1",
                "samples_seen", "train_seconds", "zeroshot_colour_acc", "zeroshot_shape_acc",
                "zeroshot_outline_top1", "zeroshot_texture_top1", "zeroshot_noise_top1"):
        assert key in metrics, key
    assert metrics["samples_seen"] == 192 and metrics["train_seconds"] > 0
    assert metrics["data_skipped"] == 0  # recorded by every stage (the shapes world has no bad samples)
    assert 0.0 <= metrics["zeroshot_top1"] <= 1.0


def test_phases_switch_resolution_and_batch_at_the_right_samples(finished_run):
    *_, steps = finished_run
    assert steps == [[0, 16, 32], [32, 16, 32]] + [[64 + 16 * i, 32, 16] for i in range(8)]


def test_training_curves_reach_tensorboard(finished_run):
    _, sdir, *_ = finished_run
    events = EventAccumulator(str(sdir.root / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/temperature", "train/lr", "train/resolution", "train/batch_size",
                "perf/images_per_sec", "eval/zeroshot_top1"):
        assert tag in tags, tag
    resolutions = [e.value for e in events.Scalars("train/resolution")]
    assert resolutions[0] == 16 and resolutions[-1] == 32


def test_vanilla_clip_baseline_runs_side_by_side(tiny_world, tmp_path):
    cfg = load_stage_recipe("pretrain", tiny_run(tiny_world, tmp_path, "run=vanilla",
                                           "callbacks=[{name: checkpoint}]"), recipe="pretrain_vanilla")
    assert cfg.optim.name == "adamw" and not cfg.pretrain.mask_reg.enabled and cfg.model.vision.pool_type == "tok"
    export = run_stage(cfg)
    model = build_model(cfg.model.preset, vision=dict(cfg.model.vision), text=dict(cfg.model.text))
    load_checkpoint(model, export / "model.pt")
    assert model.visual.attn_pool is None and json.loads((export / "metrics.json").read_text())["samples_seen"] == 192


def _stage_with_trainer(tiny_world, tmp_path, trainer, *overrides):
    from pe_lightning.stages.pretrain import PretrainStage

    stage = PretrainStage(load_stage_recipe("pretrain", tiny_run(tiny_world, tmp_path, *overrides)))
    stage._trainer = trainer
    return stage


def test_lamb_under_lightnings_fsdp1_is_refused_with_the_fix(tiny_world, tmp_path):
    """FSDP1 flattens weights together: no whole-weight norms. Our `fsdp` (FSDP2) runs LAMB (tests/test_fsdp.py)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from pe_lightning.config import RecipeError

    fsdp = SimpleNamespace(strategy=FSDPStrategy(), world_size=1)
    with pytest.raises(RecipeError, match=r"optim.name=lamb does not run under.*Use trainer.strategy=fsdp"):
        _stage_with_trainer(tiny_world, tmp_path, fsdp).configure_optimizers()
    adamw = _stage_with_trainer(tiny_world, tmp_path, fsdp, "optim.name=adamw").configure_optimizers()
    assert isinstance(adamw, torch.optim.AdamW)


def test_global_batch_must_split_into_whole_chunks_per_rank(tiny_world, tmp_path):
    from types import SimpleNamespace

    from pe_lightning.config import RecipeError

    phases = "train.phases=[{until_samples: 192, resolution: 32, batch_size: 32}]"
    ok = _stage_with_trainer(tiny_world, tmp_path, SimpleNamespace(world_size=2), phases, "data.chunk_size=16")
    ok.setup("fit")  # 16 per rank: one chunk each
    bad = _stage_with_trainer(tiny_world, tmp_path, SimpleNamespace(world_size=4), phases, "data.chunk_size=16")
    with pytest.raises(RecipeError, match=r"over 4 processes.*multiple of 4 x data.chunk_size"):
        bad.setup("fit")


def test_eval_command_reproduces_the_training_end_figures(finished_run, tiny_world, tmp_path, capsys):
    """`pe-lightning eval export=DIR data.root=...` scores an export on a recipe's sets at its last training
    resolution: on the same sets it gives the figures the clip_eval callback wrote at the end of training."""
    from pe_lightning.cli import main

    cfg, _, export, _ = finished_run
    out = tmp_path / "figures.json"
    with pytest.raises(SystemExit) as done:
        main(["eval", f"export={export}", f"out={out}", f"data.root={tiny_world}", "data.image_size=32"])
    assert done.value.code == 0
    figures = json.loads(out.read_text())
    metrics = json.loads((export / "metrics.json").read_text())
    for key in ("zeroshot_top1", "zeroshot_heldout_top1", "zeroshot_noise_top1", "retrieval_i2t_r1"):
        assert figures[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert '"zeroshot_top1"' in capsys.readouterr().out


def test_eval_command_names_a_missing_set(finished_run, tmp_path):
    from pe_lightning.config import RecipeError
    from pe_lightning.eval.eval_run import evaluate_export

    _, _, export, _ = finished_run
    with pytest.raises(RecipeError, match="eval set shapes: .*does not exist.*data.root"):
        evaluate_export(export, [f"data.root={tmp_path / 'nowhere'}"])


def test_mask_reg_token_forms_pull_what_they_name(tiny_world, tmp_path):
    from pe_lightning.config import RecipeError
    from pe_lightning.stages.pretrain import MaskRegArgs, PretrainStage, mask_reg_loss

    clean = torch.randn(2, 1 + 4, 8)  # [cls] + 4 patches
    mask = torch.tensor([[True, False, False, False], [False, True, False, False]])
    masked = clean.clone()
    masked[0, 1 + 1] = -clean[0, 1 + 1]  # an unmasked position of the masked copy differs
    assert mask_reg_loss(MaskRegArgs(tokens="masked"), masked, clean, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert mask_reg_loss(MaskRegArgs(tokens="all"), masked, clean, mask).item() == pytest.approx(2.0 / 10, abs=1e-5)
    masked[1, 1 + 1] = -clean[1, 1 + 1]  # a masked position differs: both forms see it
    assert mask_reg_loss(MaskRegArgs(tokens="masked"), masked, clean, mask).item() == pytest.approx(1.0, abs=1e-5)

    typo = load_stage_recipe("pretrain", tiny_run(tiny_world, tmp_path, "pretrain.mask_reg.tokens=maskd"))
    with pytest.raises(RecipeError, match=r"mask_reg.tokens must be one of \('all', 'masked'\), got 'maskd'"):
        PretrainStage(typo)  # before any training
