"""`pe-lightning report`: the run's report.md (headlines, per-stage tables with the parent's cost, probe and loss
plots) from a real tiny pretrain run, its pipeline probe, and a finished later stage."""

import json
import subprocess
import sys

import pytest

from conftest import tiny_run
from pe_lightning.pipeline import StageDir, probe_stage, run_stage
from pe_lightning.report import ReportError, write_report
from pe_lightning.stages import load_stage_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tiny_world, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_stage_recipe("pretrain", tiny_run(tiny_world, runs, "callbacks=[{name: checkpoint}, {name: clip_eval}]"))
    run_stage(cfg)
    probe_stage(cfg)  # what `make pipeline` does after each stage
    video = StageDir(runs / "t" / "video")  # a finished later stage that measured its parent's figure too
    video.export.mkdir(parents=True)
    (video.export / "metrics.json").write_text(json.dumps(
        {"video_t2v_r1": 0.5, "parent_video_t2v_r1": 0.4, "zeroshot_top1": 0.59, "parent_zeroshot_top1": 0.608,
         "samples_seen": 2816, "train_seconds": 276.0}))
    video.done.write_text("{}")
    return runs / "t"


def test_pipeline_probe_writes_the_exports_curves_once(run_dir):
    probe = run_dir / "pretrain" / "probe" / "probe.json"
    result = json.loads(probe.read_text())
    assert [e["layer"] for e in result["knn"]] == [1, 2] and result["dense"]
    before = probe.stat().st_mtime_ns
    cfg = load_stage_recipe("pretrain", [f"runs_dir={run_dir.parent}", "run=t", f"data.root={run_dir}"])
    probe_stage(cfg)  # already probed: nothing is recomputed (the data root given here would not even work)
    assert probe.stat().st_mtime_ns == before


def test_report_holds_headlines_tables_with_the_parent_cost_and_plots(run_dir):
    report = write_report(run_dir)
    text = report.read_text()
    pretrain = json.loads((run_dir / "pretrain" / "export" / "metrics.json").read_text())
    assert f"| pretrain | zero-shot top-1 {100 * pretrain['zeroshot_top1']:.1f}% |" in text
    assert "| video | video t2v R@1 50.0% (+10.0 over the parent) | 2816 | 4.6 min |" in text
    assert "| `zeroshot_top1` | 59.0% | 60.8% | -1.8 pts |" in text  # what video cost in image zero-shot
    assert "| `samples_seen` | 2,816 |  |  |" in text
    for png in ("report_probes.png", "report_loss.png"):
        assert f"]({png})" in text and (run_dir / png).read_bytes()[:8] == PNG_MAGIC


def test_report_command_and_its_errors(run_dir, tmp_path):
    cmd = [sys.executable, "-m", "pe_lightning.cli", "report", f"runs_dir={run_dir.parent}", "run=t"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("report.md"), done.stderr
    assert (done.stdout + done.stderr).count("report.md") == 1  # the path, once
    missing = subprocess.run(cmd[:-1] + ["run=nope"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such run folder" in missing.stderr
    (tmp_path / "empty" / "pretrain").mkdir(parents=True)
    with pytest.raises(ReportError, match="no stage is DONE yet"):
        write_report(tmp_path / "empty")
    with pytest.raises(ReportError, match="unexpected argument"):
        from pe_lightning.report import main

        main(["rn=t"])


def test_one_row_per_figure_the_first_sets_named_copies_and_the_baselines_own_keys_left_out():
    from pe_lightning.report import metrics_table

    metrics = {"zeroshot_top1": 0.5, "zeroshot_shapes_top1": 0.5, "zeroshot_noise_top1": 0.2,
               "retrieval_i2t_r1": 0.3, "retrieval_shapes_i2t_r1": 0.3, "parent_zeroshot_top1": 0.6,
               "parent_zeroshot_shapes_top1": 0.6, "parent_blend": 0.25, "video_t2v_r1": 0.4}
    rows = metrics_table("video", metrics, ("shapes", "shapes"))
    keys = [row.split("`")[1] for row in rows[2:]]
    assert sorted(keys) == ["parent_blend", "retrieval_i2t_r1", "video_t2v_r1", "zeroshot_noise_top1",
                            "zeroshot_top1"]
    assert rows[0] == "| figure | this stage | parent | change |"
    assert "| `zeroshot_top1` | 50.0% | 60.0% | -10.0 pts |" in rows
    assert "| `parent_blend` | 0.25 |  |  |" in rows  # a knob that starts with parent_, not a parent figure


def test_the_headlines_own_baseline_fills_its_columns_scratch_and_blind():
    from pe_lightning.report import metrics_table

    distill = metrics_table("distill", {"zeroshot_top1": 0.4, "scratch_zeroshot_top1": 0.2, "parent_zeroshot_top1": 0.6,
                                        "teacher_zeroshot_top1": 0.6, "distill_gain_zeroshot_top1": 0.2})
    assert distill[0] == "| figure | this stage | parent | change | scratch | change |"
    assert distill[2:] == ["| `zeroshot_top1` | 40.0% | 60.0% | -20.0 pts | 20.0% | +20.0 pts |"]
    lang = metrics_table("lang", {"vqa_exact_match": 0.5, "vqa_blind_exact_match": 0.25})
    assert lang[0] == "| figure | this stage | blind | change |"
    assert lang[2:] == ["| `vqa_exact_match` | 50.0% | 25.0% | +25.0 pts |"]
    assert metrics_table("pretrain", {"zeroshot_top1": 0.5})[0] == "| figure | this stage |"  # no parent: no columns


def test_a_run_without_probes_says_the_command_that_makes_them(tmp_path):
    pretrain = StageDir(tmp_path / "r" / "pretrain")
    pretrain.export.mkdir(parents=True)
    (pretrain.export / "metrics.json").write_text(json.dumps({"zeroshot_top1": 0.5, "samples_seen": 10}))
    pretrain.done.write_text("{}")
    text = write_report(tmp_path / "r").read_text()
    assert "`make probe run=r stage=pretrain`" in text and "report_probes.png" not in text
