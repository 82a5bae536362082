"""Exact resume: a stage killed with SIGKILL (mid-stage, after a phase change, or while writing its
checkpoint) and started again ends with the same weights as a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from pe_lightning.pipeline import StageDir

pytestmark = pytest.mark.slow

# A user's callback, in a file outside the package: slows each step so the test can kill mid-run.
SLOW_STEPS = '''
import time, lightning as L
class SlowSteps(L.Callback):
    def __init__(self, seconds=0.3):
        self.seconds = seconds
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)
'''

# Kills its own process with SIGKILL halfway through writing the second checkpoint.
KILL_IN_SAVE = '''
import os, signal, lightning as L
class KillDuringSecondSave(L.Callback):
    def __init__(self):
        self.saves = 0
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves += 1
        if self.saves == 2:
            io = trainer.strategy.checkpoint_io
            original = io.save_checkpoint
            def torn(checkpoint, path, storage_options=None):
                with open(path, "wb") as handle:
                    handle.write(b"half a checkpoint")
                    handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            io.save_checkpoint = torn
'''


def _callbacks(*extra: str) -> str:
    return "callbacks=[{name: checkpoint}, {name: clip_eval}" + "".join(f", {e}" for e in extra) + "]"


def _command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "pe_lightning.cli", "train", "stage=pretrain", *overrides]


def _weights(export: Path) -> dict:
    return torch.load(export / "model.pt", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory):
    """The uninterrupted run, in a fresh process like the killed ones: the compiled LAMB update's kernels depend
    on what the process compiled before (in the test process: every earlier test), so an in-process reference
    would compare compile histories, not resumes."""
    runs = tmp_path_factory.mktemp("reference")
    done = subprocess.run(_command(tiny_run(tiny_world, runs, _callbacks())), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _weights(StageDir(runs / "t" / "pretrain").export)


def _wait_for(predicate, process, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before the kill point")
        time.sleep(0.05)
    raise AssertionError("kill point not reached in time")


def test_sigkill_after_a_phase_change_then_resume_is_exact(tiny_world, tmp_path, reference):
    slow = tmp_path / "slow_steps.py"
    slow.write_text(SLOW_STEPS)
    overrides = tiny_run(tiny_world, tmp_path, _callbacks(f"{{name: '{slow}:SlowSteps'}}"))
    sdir = StageDir(tmp_path / "t" / "pretrain")
    process = subprocess.Popen(_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def past_phase_change():  # the phase changes at 64 samples; a checkpoint exists beyond it
        return sdir.progress.exists() and json.loads(sdir.progress.read_text())["samples_seen"] >= 96

    _wait_for(past_phase_change, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not sdir.done.exists() and sdir.checkpoint.exists()

    resumed = subprocess.run(_command(overrides), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming stage pretrain" in resumed.stderr
    _assert_same_weights(_weights(sdir.export), reference)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_world, tmp_path, reference):
    killer = tmp_path / "kill_in_save.py"
    killer.write_text(KILL_IN_SAVE)
    sdir = StageDir(tmp_path / "t" / "pretrain")
    first = tiny_run(tiny_world, tmp_path, _callbacks(f"{{name: '{killer}'}}"))
    killed = subprocess.run(_command(first), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert (sdir.checkpoint.parent / "last.ckpt.tmp").read_bytes() == b"half a checkpoint"
    state = torch.load(sdir.checkpoint, map_location="cpu", weights_only=False)  # the previous one, whole
    assert state["pe_state"]["samples_seen"] == 64 and state["global_step"] == 2

    resumed = subprocess.run(_command(tiny_run(tiny_world, tmp_path, _callbacks())), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(_weights(sdir.export), reference)


def test_sigterm_saves_and_stops_then_resumes(tiny_world, tmp_path, reference):
    slow = tmp_path / "slow_steps.py"
    slow.write_text(SLOW_STEPS)
    overrides = tiny_run(tiny_world, tmp_path, _callbacks(f"{{name: '{slow}:SlowSteps'}}"),
                         "trainer.checkpoint_every_n_steps=1000")
    sdir = StageDir(tmp_path / "t" / "pretrain")
    process = subprocess.Popen(_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tb = sdir.root / "tb"
    _wait_for(lambda: tb.exists() and any(tb.iterdir()), process)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-3000:]  # the manager reports where it stopped
    assert "run the same command again to resume" in stderr
    progress = json.loads(sdir.progress.read_text())
    assert 0 < progress["samples_seen"] < 192
    resumed = subprocess.run(_command(overrides), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(_weights(sdir.export), reference)
