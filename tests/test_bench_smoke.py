"""`make bench` runs end to end on CPU and writes a report whose numbers are there and consistent. (The figures
themselves are measurements for bench/README.md, never asserted: this only guards the harness.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_bench_cpu_sections_write_a_complete_report(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "bench/run_bench.py", "--device", "cpu", "--sections", "step,variants,profile",
         "--drivers", "lightning,loop", "--variants", "no-mask-reg", "--steps", "2", "--warmup", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (report_path,) = out.glob("cpu-*.json")
    report = json.loads(report_path.read_text())
    step = report["sections"]["step"]
    rows = {row["driver"]: row for row in step["rows"]}
    assert set(rows) == {"lightning", "loop"}
    for row in rows.values():
        assert row["status"] == "ok" and row["images_per_s"] > 0 and row["recompiles_in_timed_steps"] == 0
    assert step["lamb_path"] == "our FusedLamb, compiled"  # the recipe's default optimizer path
    (variant,) = report["sections"]["variants"]["rows"]
    assert variant["status"] == "ok" and variant["images_per_s"] > 0

    profile = report["sections"]["profile"]
    assert profile["status"] == "ok"
    assert sum(profile["share"].values()) == pytest.approx(1.0)
    assert profile["ms_per_step"]["matmul"] > 0 and profile["ms_per_step"]["optimizer"] > 0
    markdown = report_path.with_suffix(".md").read_text()
    for heading in ("## Training step", "## Variants of our step", "## Where the step's time goes"):
        assert heading in markdown


def test_bench_stage_rows_measure_ours_against_open_clip(tmp_path):
    """The video and distill rows: each stage's step and its open_clip peer measured in the same run."""
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "bench/run_bench.py", "--device", "cpu", "--sections", "video,distill", "--steps", "2",
         "--warmup", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (report_path,) = out.glob("cpu-*.json")
    sections = json.loads(report_path.read_text())["sections"]
    for name in ("video", "distill"):
        section = sections[name]
        assert section["status"] == "ok", section
        rows = section["rows"]
        assert len(rows) >= 2 and all(r["status"] == "ok" for r in rows), rows
        assert any("open_clip" in r["name"] for r in rows), [r["name"] for r in rows]
    markdown = report_path.with_suffix(".md").read_text()
    assert "## Video step (ours)" in markdown and "## Distill step" in markdown
