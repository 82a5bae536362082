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
    missing = subprocess.run(cmd[:-1] + ["run=nope"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such run folder" in missing.stderr
    (tmp_path / "empty" / "pretrain").mkdir(parents=True)
    with pytest.raises(ReportError, match="no stage is DONE yet"):
        write_report(tmp_path / "empty")
    with pytest.raises(ReportError, match="unexpected argument"):
        from pe_lightning.report import main

        main(["rn=t"])
