"""Progressive resolution / batch-size phases over samples seen."""

import doctest

import pytest

import pe_lightning.stages.phases as phases_module
from pe_lightning.stages.phases import Phase, PhaseSchedule


def _schedule(**kw):
    return PhaseSchedule(
        [Phase(100, 98, 32), Phase(250, 154, 64), Phase(None, 224, 64)],
        total_samples=400, patch_size=14, chunk_size=16, **kw,
    )


def test_phases_switch_at_sample_counts():
    s = _schedule()
    assert s.boundaries == (100, 250, 400)
    assert [s.at(n)[0] for n in (0, 99, 100, 249, 250, 399, 400, 10_000)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert s.at(0)[1] == Phase(100, 98, 32)
    assert s.at(100)[1].resolution == 154 and s.at(100)[1].batch_size == 64
    assert s.at(399)[1] == Phase(400, 224, 64)  # None filled with total_samples
    assert s.max_resolution == 224 and len(s) == 3 and list(s)[1] == s[1]
    with pytest.raises(ValueError, match="samples_seen"):
        s.at(-1)


def test_single_phase_and_only_phases():
    s = PhaseSchedule([Phase(50, 64, 16)], total_samples=50)
    assert s.at(0) == (0, Phase(50, 64, 16)) and s.at(49)[0] == 0
    with pytest.raises(TypeError, match="Phase objects"):
        PhaseSchedule([(10, 32, 8), (20, 64, 8)], total_samples=20)


@pytest.mark.parametrize("phases, kw, match", [
    ([], {}, "at least one phase"),
    ([Phase(250, 98, 32), Phase(100, 154, 32), Phase(None, 224, 32)], {}, r"phase 1 .*greater than the previous"),
    ([Phase(100, 98, 32), Phase(300, 154, 32)], {}, r"phase 1 .*must end at total_samples=400"),
    ([Phase(None, 98, 32), Phase(400, 154, 32)], {}, r"phase 0 .*only allowed on the last phase"),
    ([Phase(400, 98, 32), Phase(None, 154, 32)], {}, r"phase 0 .*leaving later phases empty"),
    ([Phase(100, 98, 32), Phase(None, 150, 32)], {"patch_size": 14}, r"phase 1 .*resolution 150 .*patch size 14"),
    ([Phase(100, 98, 40), Phase(None, 154, 32)], {"chunk_size": 16}, r"phase 0 .*batch_size 40 .*chunk size 16"),
    ([Phase(100, 98, 32), Phase(None, 154, 48)], {"chunk_size": 16, "world_size": 2},
     r"phase 1 .*batch_size 48 .*= 32"),
    ([Phase(None, 98, 0)], {}, r"phase 0 .*batch_size must be > 0"),
])
def test_bad_configs_rejected_with_phase_named(phases, kw, match):
    with pytest.raises(ValueError, match=match):
        PhaseSchedule(phases, total_samples=400, **kw)


def test_local_batch_size():
    assert Phase(10, 98, 64).local_batch_size(4) == 16
    with pytest.raises(ValueError, match="world_size 3"):
        Phase(10, 98, 64).local_batch_size(3)


def test_docstring_example_runs():
    failures, tried = doctest.testmod(phases_module)
    assert tried > 0 and failures == 0
