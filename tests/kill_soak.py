"""The kill soak: `make pipeline` at a tiny scale, SIGKILLed again and again until it finishes, must end with
exports equal to those of an uninterrupted pipeline, and never leave a run folder it cannot continue.

  python tests/kill_soak.py --out /tmp/soak [--kills 20] [--seed 0]        (make soak kills=20)

The pipeline is every stage of recipes/pipeline.yaml with its probes, at the tiny scale the stage contract
test uses (tests/test_stage_contract.py SMOKE, routed to each stage by the pipeline's `STAGE:key=value`), on a
tiny shapes world and a tiny random LM. First an uninterrupted reference run, timed. Then the soaked run: each
attempt is the same `pe-lightning pipeline` command, killed with SIGKILL either
- at a random moment (uniform over the first half of the reference's wall time: anywhere in a step, an
  eval, a stage switch, a probe), or
- inside a write (PE_KILL_AT_RENAME=N, pe_lightning/io.crash_point: at the N-th atomic rename of the attempt,
  the temporary file complete and the target untouched: a checkpoint, an export, DONE, a teacher-cache shard),
chosen by a seeded coin. After every kill `pe-lightning status` must still read the run, and the next attempt
must continue it: any attempt that exits with an error fails the soak. After `--kills` kills the last attempt
runs to the end. Then every export's tensors (model.pt, projector.pt, the LM's safetensors) must be
`torch.equal` to the reference's, and every probe.json equal. Prints and returns a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import TINY_MODEL, TINY_SCHEDULE  # noqa: E402
from test_stage_contract import SMOKE  # noqa: E402

RUN = "soak"


def pipeline_command(world: Path, runs: Path) -> list[str]:
    """The tiny pipeline: shared tiny keys for every stage, each stage's smoke keys for it alone."""
    shared = [f"data.root={world}", "data.generate=false", "data.image_size=32", "data.workers=1",
              f"runs_dir={runs}", *TINY_MODEL, *TINY_SCHEDULE, "trainer.threads=1",
              "callbacks=[{name: checkpoint}]"]
    own = [f"{stage}:{word}" for stage, words in SMOKE.items() for word in words]
    return [sys.executable, "-m", "pe_lightning.cli", "pipeline", f"run={RUN}", *shared, *own]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PE_KILL_AT_RENAME"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_to_end(cmd: list[str], log: Path) -> float:
    start = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"the uninterrupted pipeline failed (exit {done.returncode}); see {log}")
    return time.monotonic() - start


def attempt(cmd: list[str], log: Path, kill_after_s: float | None, kill_at_rename: int | None) -> int:
    """One pipeline command: killed after kill_after_s seconds, or at its N-th atomic rename, or run to the end.
    Returns its exit code (-9 when killed)."""
    env = _env(PE_KILL_AT_RENAME=str(kill_at_rename)) if kill_at_rename else _env()
    with open(log, "a") as out:
        out.write(f"\n===== attempt: kill_after_s={kill_after_s} kill_at_rename={kill_at_rename}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=kill_after_s if kill_after_s is not None else 3600)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            return proc.wait()


def status_reads(runs: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "pe_lightning.cli", "status", f"runs_dir={runs}", f"run={RUN}"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"`pe-lightning status` fails on the killed run:\n{done.stderr[-2000:]}")
    return done.stdout


def _tensor_files(export: Path) -> list[Path]:
    return sorted(p for p in export.rglob("*") if p.suffix in (".pt", ".safetensors"))


def compare_exports(reference: Path, soaked: Path) -> list[str]:
    """Differences between the two runs' exports and probes (empty: equal)."""
    import torch
    from safetensors.torch import load_file

    def load(path: Path) -> dict:
        return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)

    problems = []
    for ref_export in sorted(reference.glob("*/export")):
        stage = ref_export.parent.name
        soak_export = soaked / stage / "export"
        ref_files = [p.relative_to(ref_export) for p in _tensor_files(ref_export)]
        soak_files = [p.relative_to(soak_export) for p in _tensor_files(soak_export)] if soak_export.is_dir() else []
        if ref_files != soak_files:
            problems.append(f"{stage}: export files {soak_files} != {ref_files}")
            continue
        for rel in ref_files:
            a, b = load(ref_export / rel), load(soak_export / rel)
            unequal = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
            if unequal or a.keys() != b.keys():
                problems.append(f"{stage}/{rel}: {len(unequal)} tensors differ (first: {unequal[:3]})")
        ref_probe, soak_probe = (r / stage / "probe" / "probe.json" for r in (reference, soaked))
        if ref_probe.exists():
            scores = ("knn", "linear", "dense", "head")  # not paths or timings
            a, b = ({k: json.loads(p.read_text()).get(k) for k in scores} if p.exists() else None
                    for p in (ref_probe, soak_probe))
            if a != b:
                problems.append(f"{stage}: probe.json differs from the reference's")
    return problems


def soak(out: Path, kills: int, seed: int) -> dict:
    from pe_lightning.data.testing import tiny_shapes_world

    out.mkdir(parents=True, exist_ok=True)
    for previous in ("world", "reference", "soaked"):  # every soak starts clean
        shutil.rmtree(out / previous, ignore_errors=True)
    world = tiny_shapes_world(out / "world")
    reference_s = run_to_end(pipeline_command(world, out / "reference"), out / "reference.log")
    # The spatial stage builds its teacher cache inside the data root: the soaked run builds (and is killed
    # while building) its own.
    shutil.rmtree(world / "teacher_cache")
    rng = random.Random(seed)
    cmd, log = pipeline_command(world, out / "soaked"), out / "soaked.log"
    log.write_text("")
    kinds = {"timed": 0, "in_write": 0}
    attempts = 0
    while True:
        attempts += 1
        killing = sum(kinds.values()) < kills
        in_write = killing and rng.random() < 0.5
        code = attempt(cmd, log, kill_after_s=rng.uniform(3.0, reference_s / 2) if killing and not in_write else None,
                       kill_at_rename=rng.randint(1, 40) if in_write else None)
        if code == 0:
            break
        if code != -signal.SIGKILL:
            raise SystemExit(f"attempt {attempts} exited with {code} after {sum(kinds.values())} kills: the run "
                             f"folder could not be continued; see {log}")
        kinds["in_write" if in_write else "timed"] += 1
        status_reads(out / "soaked")
    problems = compare_exports(out / "reference" / RUN, out / "soaked" / RUN)
    summary = {"kills": sum(kinds.values()), **{f"kills_{k}": n for k, n in kinds.items()}, "attempts": attempts,
               "reference_seconds": round(reference_s, 1), "stages": sorted(p.parent.name for p in
                                                                           (out / "reference" / RUN).glob("*/DONE")),
               "exports_equal": not problems, "problems": problems}
    (out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (world, both runs, logs, soak.json)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to survive before the last attempt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = soak(args.out, args.kills, args.seed)
    print(json.dumps(summary, indent=2))
    return 0 if summary["exports_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
