"""Section `embedded`: the CPU embedded default (`make stage=pretrain`: the tiny preset on the shapes world),
its training wall time and zero-shot accuracy.

By default nothing is run (it takes about ten minutes): the figures are read from a finished run's
`runs/<run>/pretrain/export/metrics.json` (the newest one under `runs/`, or `--embedded-from PATH`).
`train_seconds` there is the time spent in `Trainer.fit` summed over resumes. With `--embedded-run`,
`pe-lightning train stage=pretrain run=bench-embedded` runs in a subprocess from a clean runs folder
(`runs/_bench/`), and its whole wall time is recorded (process start, shapes-world generation if the world
is missing, training, final evaluation and export).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from bench.common import ROOT

HEADLINE = ("zeroshot_top1", "zeroshot_heldout_top1", "zeroshot_top5", "retrieval_i2t_r1", "retrieval_t2i_r1",
            "samples_seen", "train_seconds")


def default_recipe_keys() -> dict:
    """The result-determining keys of `make stage=pretrain` (the default recipe, no overrides)."""
    from pe_lightning.config import result_keys
    from pe_lightning.stages import load_stage_recipe

    return result_keys(load_stage_recipe("pretrain", []))


def deviations(metrics_file: Path, default: dict) -> dict:
    """{key: (run's value, default's value)} for the result keys where the run differs from the default."""
    from omegaconf import OmegaConf

    from pe_lightning.config import result_keys

    config = metrics_file.parent / "config.yaml"
    if not config.is_file():
        return {"config.yaml": ("missing", "present")}
    have = result_keys(OmegaConf.load(config))
    keys = [k for k in sorted(set(have) | set(default)) if not k.startswith(("data.root", "stage"))]
    return {k: (have.get(k), default.get(k)) for k in keys if have.get(k) != default.get(k)}


def find_metrics(spec: Optional[str]) -> Optional[Path]:
    """`spec` (a run / stage / export dir or the file), else the newest finished pretrain run under runs/ that
    used the default recipe, else the newest finished one at all (its deviations are then reported)."""
    if spec:
        p = Path(spec)
        for candidate in (p, p / "metrics.json", p / "export" / "metrics.json", p / "pretrain" / "export" /
                          "metrics.json"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"--embedded-from {spec}: no metrics.json there (a run dir, stage dir, export "
                                "dir or the file itself)")
    found = sorted((ROOT / "runs").glob("**/pretrain/export/metrics.json"), key=lambda q: q.stat().st_mtime)
    if not found:
        return None
    try:
        default = default_recipe_keys()
        for candidate in reversed(found):
            if not deviations(candidate, default):
                return candidate
    except Exception:  # the recipe cannot be compared: fall back to the newest run
        pass
    return found[-1]


def summarise(metrics_file: Path) -> dict:
    metrics = json.loads(metrics_file.read_text())
    out: dict[str, Any] = {"metrics_file": str(metrics_file.relative_to(ROOT) if metrics_file.is_relative_to(ROOT)
                                                else metrics_file)}
    out["headline"] = {k: metrics[k] for k in HEADLINE if k in metrics}
    out["zeroshot"] = {k: v for k, v in metrics.items() if k.startswith("zeroshot") and isinstance(v, (int, float))}
    config = metrics_file.parent / "config.yaml"
    if config.is_file():
        text = config.read_text()
        for key in ("preset:", "total_samples:"):
            line = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith(key)), None)
            if line:
                out[key.rstrip(":")] = line.split(":", 1)[1].strip()
    return out


def bench_embedded(ctx) -> dict:
    section: dict[str, Any] = {"status": "ok"}
    if ctx.embedded_run:
        runs_dir = ROOT / "runs" / "_bench"
        shutil.rmtree(runs_dir / "bench-embedded", ignore_errors=True)
        runs_dir.mkdir(parents=True, exist_ok=True)
        log = runs_dir / "bench-embedded.log"
        cmd = [sys.executable, "-m", "pe_lightning.cli", "train", "stage=pretrain", "run=bench-embedded",
               f"runs_dir={runs_dir}"]
        print(f"[bench] embedded: {' '.join(cmd)} (log: {log})", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        section.update(source="--embedded-run", command=" ".join(cmd[1:]), wall_s=time.perf_counter() - t0,
                       returncode=proc.returncode, log=str(log.relative_to(ROOT)))
        if proc.returncode:
            section.update(status="failed", error=f"exit code {proc.returncode}; see {log}")
            return section
        metrics = find_metrics(str(runs_dir / "bench-embedded"))
    else:
        metrics = find_metrics(ctx.embedded_from)
        section["source"] = "finished run"
    if metrics is None:
        section.update(status="skipped", note="no finished run under runs/ (run `make stage=pretrain`, or pass "
                                              "--embedded-run)")
        return section
    section.update(summarise(metrics))
    try:
        diff = deviations(metrics, default_recipe_keys())
    except Exception as err:
        diff = {"?": (f"{type(err).__name__}: {err}", "")}
    section["default_recipe"] = not diff
    if diff:
        section["deviations"] = {k: {"run": str(a), "default": str(b)} for k, (a, b) in list(diff.items())[:12]}
        section["note"] = ("this run is not the default recipe (" + ", ".join(f"{k}={a}" for k, (a, _) in
                                                                          list(diff.items())[:4]) + ")")
    return section
