"""The kill soak at its smallest: the tiny pipeline SIGKILLed at random moments and inside writes, then every
export equal to an uninterrupted run's (tests/kill_soak.py; `make soak kills=20` for the long one)."""

import pytest

from kill_soak import soak


@pytest.mark.slow
def test_the_pipeline_survives_kills_and_ends_with_the_uninterrupted_exports(tmp_path):
    summary = soak(tmp_path, kills=4, seed=1)
    assert summary["stages"] == ["distill", "lang", "pretrain", "spatial", "video"]
    assert summary["kills"] >= 1, summary  # the pipeline was interrupted at least once, and continued
    assert summary["exports_equal"], summary["problems"]
