"""A quiet, honest terminal: none of the third-party lines a user can do nothing about, a progress display over
the run's own steps, and our lines on lines of their own (issue #30)."""

import logging
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest

from conftest import tiny_run
from pe_lightning.progress import ProgressLines, RunProgressBar, progress_callback
from pe_lightning.quiet import quiet_start
from pe_lightning.stages.phases import Phase, PhaseSchedule

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("💡 Tip", "litlogger", "LeafSpec", "No CUDA runtime", "CUDA_HOME", "GPU available", "TPU available",
         "project.license", "Epoch 0")


def test_pyproject_license_is_an_spdx_string_setuptools_takes_without_a_warning():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert not [w for w in caught if "license" in str(w.message)]
    assert dist.metadata.license_expression == "Apache-2.0"


def test_lightnings_tip_and_device_lines_are_dropped_and_its_other_lines_kept(caplog, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    quiet_start()
    with caplog.at_level(logging.INFO):
        L.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
        rank_zero_info("a line Lightning still says")
    said = caplog.text
    assert "a line Lightning still says" in said
    assert not [n for n in NOISE if n in said], said


@contextmanager
def said(name: str):
    """The messages a logger emits meanwhile (after its filters), at INFO and above."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_torchs_cuda_home_line_is_dropped(tmp_path):
    quiet_start()
    with said("torch.utils.cpp_extension") as seen:
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='%s'",
                                                               tmp_path)
        logging.getLogger("torch.utils.cpp_extension").warning("another cpp_extension warning")
    assert seen == ["another cpp_extension warning"]


def test_the_leafspec_deprecation_is_ignored():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_start()
        _tree_flatten({"a": 1})
        warnings.warn("a FutureWarning of our own", FutureWarning)
    assert [str(w.message) for w in caught] == ["a FutureWarning of our own"]


class _Trainer:
    global_step, accumulate_grad_batches = 0, 1


class _Stage:
    name, samples_seen = "pretrain", 0
    schedule = PhaseSchedule([Phase(64, 16, 32), Phase(None, 32, 16)], 192)  # 2 + 8 = 10 steps


def test_the_bar_spans_the_runs_steps_and_survives_passes_over_the_data(monkeypatch):
    bar = RunProgressBar(refresh_rate=1)
    monkeypatch.setattr(bar, "get_metrics", lambda trainer, module: {"train/loss": 1.0})
    trainer, stage = _Trainer(), _Stage()
    trainer.global_step = 3  # a resumed run
    bar.on_train_start(trainer, stage)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (10, 3)
    bar.on_train_epoch_start(trainer)  # a new pass over the shards: Lightning would reset to its epoch here
    trainer.global_step = 4
    bar.on_train_batch_end(trainer, stage, None, None, 0)
    bar.on_train_epoch_end(trainer, stage)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (10, 4)
    assert bar.train_progress_bar.desc.startswith("pretrain")
    bar.train_progress_bar.close()


def test_off_a_terminal_plain_lines_every_n_steps_and_each_phase_on_its_own_line():
    progress = progress_callback(refresh_steps=1)
    assert isinstance(progress, ProgressLines)  # pytest's stdout is no terminal
    progress = ProgressLines(every=5)
    progress.get_metrics = lambda trainer, module: {"train/loss": 2.5}
    trainer, stage = _Trainer(), _Stage()
    with said("pe_lightning") as lines:
        progress.on_train_start(trainer, stage)
        for step in range(1, 11):
            trainer.global_step, stage.samples_seen = step, min(32 * step, 64) + max(0, step - 2) * 16
            progress.on_train_batch_end(trainer, stage, None, None, step)
    assert lines[0].startswith("phase 1 of 2: 16 px, batch 32") and lines[1].startswith("phase 2 of 2: 32 px")
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(" (")[0] for s in steps] == ["step 5 of 10", "step 10 of 10"]
    assert "loss 2.500" in steps[0] and "ETA" in steps[0]


@pytest.mark.slow
def test_a_runs_output_has_none_of_the_noise_and_shows_its_progress(tiny_world, tmp_path):
    """The figure of #30: a run's whole output (stdout a pipe) with no tip, LeafSpec, CUDA_HOME or device
    lines, and plain progress lines over the run's steps."""
    cmd = [sys.executable, "-m", "pe_lightning.cli", "train", "stage=pretrain",
           *tiny_run(tiny_world, tmp_path / "runs"), "trainer.progress_bar=true"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert not [n for n in NOISE if n in out], out
    assert "step 10 of 10 (100%)" in out and "phase 2 of 2" in out


def test_a_disabled_bar_on_another_rank_logs_no_phase_line(monkeypatch):
    bar = RunProgressBar(refresh_rate=1)
    monkeypatch.setattr(bar, "get_metrics", lambda trainer, module: {})
    bar.disable()  # what Lightning does on every rank but 0
    with said("pe_lightning") as lines:
        bar.on_train_start(_Trainer(), _Stage())
        bar.on_train_batch_end(_Trainer(), _Stage(), None, None, 0)
    assert lines == []
    bar.enable()
    with said("pe_lightning") as lines:
        bar.on_train_batch_end(_Trainer(), _Stage(), None, None, 0)
    assert lines[0].startswith("phase 1 of 2")
    bar.train_progress_bar.close()
