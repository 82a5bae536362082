"""One live process per run and stage: a second command is refused naming the holder's pid, `status` says
who trains the stage, a lock left by a kill -9 is taken over, and a start that fails leaves no stage folder."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_run
from pe_lightning.data.shards import DataError
from pe_lightning.pipeline import PipelineError, StageDir, run_stage, status
from pe_lightning.progress import LockProgress
from pe_lightning.runlock import RunLocked, StageLock, holder
from pe_lightning.stages import load_stage_recipe
from pe_lightning.stages.phases import Phase, PhaseSchedule

HOLD = """
import sys, time
from pe_lightning.runlock import StageLock
lock = StageLock(sys.argv[1]).acquire()
lock.total_steps = 1125
lock.update(40)
print("held", flush=True)
time.sleep(120)
"""


def _holding_process(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with StageLock(tmp_path / "r" / "pretrain") as first:
        first.total_steps = 10
        first.update(3)
        with pytest.raises(RunLocked, match=rf"pid {os.getpid()}, step 3 of 10.*kill {os.getpid()}"):
            StageLock(tmp_path / "r" / "pretrain", wait_s=0).acquire()
    assert not (tmp_path / "r" / "pretrain" / "lock").exists()  # released: no file left behind
    StageLock(tmp_path / "r" / "pretrain").acquire().release()  # and free again


def test_status_says_running_with_pid_and_step_then_a_killed_holder_is_taken_over(tmp_path):
    root = tmp_path / "r" / "pretrain"
    proc = _holding_process(root)
    try:
        assert f"running (pid {proc.pid}, step 40 of 1125)" in status(str(tmp_path), "r")
        with pytest.raises(RunLocked, match=f"pid {proc.pid}"):
            StageLock(root, wait_s=0).acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (root / "lock").exists() and holder(root) is None  # the dead process's file holds nothing
    assert "pretrain  started, no checkpoint yet" in status(str(tmp_path), "r")
    with StageLock(root, wait_s=0):
        assert holder(root).pid == os.getpid()


def test_a_second_train_command_exits_nonzero_with_one_line_naming_the_pid(tiny_world, tmp_path):
    runs = tmp_path / "runs"
    with StageLock(runs / "t" / "pretrain"):
        cmd = [sys.executable, "-m", "pe_lightning.cli", "train", "stage=pretrain", *tiny_run(tiny_world, runs)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):  # the stage manager's own check, in-process
            run_stage(load_stage_recipe("pretrain", tiny_run(tiny_world, runs)))
        assert (runs / "t" / "pretrain" / "lock").exists()  # the holder's folder is left alone
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0], done.stderr


def test_the_lock_records_the_stages_step_count(tmp_path):
    class Trainer:
        global_step, accumulate_grad_batches = 0, 1

    class Module:
        schedule = PhaseSchedule([Phase(64, 16, 32), Phase(None, 32, 16)], 192)

    with StageLock(tmp_path) as lock:
        progress = LockProgress(lock, every=2)
        progress.on_train_start(Trainer, Module)
        Trainer.global_step = 4
        progress.on_train_batch_end(Trainer, Module, None, None, 3)
        assert holder(tmp_path).describe() == f"pid {os.getpid()}, step 4 of 10"  # 64/32 + 128/16 steps


def test_a_start_that_fails_leaves_no_stage_folder(tiny_world, tmp_path):
    empty = tmp_path / "no-shards"
    empty.mkdir()
    runs = tmp_path / "runs"
    cfg = load_stage_recipe("pretrain", [*tiny_run(tiny_world, runs), f"data.root={empty}"])
    with pytest.raises(DataError):
        run_stage(cfg)
    assert not StageDir(runs / "t" / "pretrain").root.exists()
    assert "not started" in status(str(runs), "t").splitlines()[1]
    with pytest.raises(PipelineError, match="make stage=pretrain"):  # a missing parent: nothing left either
        run_stage(load_stage_recipe("video", tiny_run(tiny_world, runs)))
    assert not (runs / "t" / "video").exists()


def test_the_other_ranks_of_a_run_pass_the_early_check(tmp_path, monkeypatch):
    """Lightning starts rank 1 by re-running the command: the early refusal must not stop it at the lock its own
    rank 0 holds (it would end every DDP / FSDP run); rank 0 and a plain second command are still refused."""
    from pe_lightning.cli import _refuse_a_stage_in_use

    words = [f"runs_dir={tmp_path}", "run=r"]
    with StageLock(tmp_path / "r" / "pretrain"):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            _refuse_a_stage_in_use("pretrain", words)
        monkeypatch.setenv("LOCAL_RANK", "1")
        _refuse_a_stage_in_use("pretrain", words)  # the launched rank goes on


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_dies(tmp_path):
    """DataLoader workers are forked from the trainer and outlive a kill -9 of it by a few seconds: they must
    not hold the run's lock meanwhile (the next command would be refused, naming the dead trainer)."""
    root = tmp_path / "r" / "pretrain"
    code = ("import os, sys, time\n"
            "from pe_lightning.runlock import StageLock\n"
            "lock = StageLock(sys.argv[1]).acquire()\n"
            "if os.fork() == 0:\n"
            "    time.sleep(30)\n"  # the orphaned worker
            "    os._exit(0)\n"
            "print('locked', flush=True)\n"
            "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert holder(root) is not None and holder(root).pid == proc.pid
        proc.kill()
        proc.wait()
        assert holder(root) is None  # at once, although the forked child lives on
        StageLock(root, wait_s=0).acquire().release()
    finally:
        proc.kill()
        subprocess.run(["pkill", "-f", str(root)], check=False)
