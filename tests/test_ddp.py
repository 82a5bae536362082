"""Two-process DDP end to end, as a user launches it: `trainer.strategy=ddp trainer.devices=2` on CPU (gloo).
Lightning starts the second rank by re-running the command; the data module splits the shards by rank, the
checkpoint holds every rank's stream position, and a DDP run stopped midway and resumed ends with the same
weights as an uninterrupted DDP run."""

import subprocess
import sys

import pytest
import torch

from conftest import tiny_run

pytestmark = pytest.mark.slow

# global batches of 32 = 2 ranks x 2 chunks of 8, across a resolution change
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.threads=1",
       "data.chunk_size=8", "train.phases=[{until_samples: 64, resolution: 16, batch_size: 32},"
       " {until_samples: 192, resolution: 32, batch_size: 32}]"]

# A user's callback: stops the run (on every rank) after its 3rd step, as a preempted job would stop.
STOP_AFTER = '''
import lightning as L
class StopAfter(L.Callback):
    def __init__(self, steps=3):
        self.steps = steps
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True
'''


def _run(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pe_lightning.cli", "train", "stage=pretrain", *overrides],
                          capture_output=True, text=True, timeout=600)


def _weights(runs_dir) -> dict:
    return torch.load(runs_dir / "t" / "pretrain" / "export" / "model.pt", weights_only=True)


def test_ddp_two_processes_stop_and_resume_equals_uninterrupted(tiny_world, tmp_path):
    callbacks = "callbacks=[{name: checkpoint}]"
    whole = _run(tiny_run(tiny_world, tmp_path / "whole", *DDP, callbacks))
    assert whole.returncode == 0, whole.stderr[-3000:]

    stop_file = tmp_path / "stop_after.py"
    stop_file.write_text(STOP_AFTER)
    stopped = _run(tiny_run(tiny_world, tmp_path / "parts", *DDP,
                            f"callbacks=[{{name: checkpoint}}, {{name: '{stop_file}'}}]"))
    assert stopped.returncode != 0 and "run the same command again to resume" in stopped.stderr, \
        stopped.stderr[-3000:]
    resumed = _run(tiny_run(tiny_world, tmp_path / "parts", *DDP, callbacks))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming stage pretrain" in resumed.stderr

    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_with_the_fix(tiny_world, tmp_path):
    """16 global = 8 per rank, not a whole number of 16-sample chunks: refused at start, not mid-run."""
    bad = _run(tiny_run(tiny_world, tmp_path, *DDP[:4], "data.chunk_size=16",
                        "train.phases=[{until_samples: 192, resolution: 32, batch_size: 16}]"))
    assert bad.returncode != 0
    assert "train.phases over 2 processes" in bad.stderr and "multiple of 2 x data.chunk_size" in bad.stderr, \
        bad.stderr[-3000:]
