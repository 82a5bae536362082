"""The Makefile as a user meets it: `make help` lists every target, and the echoed command is tidy."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(*args: str) -> str:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True).stdout


def phony_targets() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    return [t for line in re.findall(r"^\.PHONY:(.*)$", text, re.M) for t in line.split()]


def test_make_help_lists_every_phony_target():
    shown = _make("help")
    targets = phony_targets()
    assert {"help", "test-fast", "clean-venv", "train"} <= set(targets)
    # `default` is the bare `make` (it shows the help); every other target by its name
    missing = [t for t in targets if t != "default" and not re.search(rf"make {re.escape(t)}\b", shown)]
    assert not missing, f"make help does not list {missing}"
    assert "make alone" in shown


def test_the_echoed_train_command_has_no_run_of_spaces():
    dry = _make("-n", "stage=pretrain", "run=x", "train.total_samples=64")
    line = next(line for line in dry.splitlines() if "pe-lightning train" in line)
    assert "  " not in line and "'train.total_samples=64'" in line, line
