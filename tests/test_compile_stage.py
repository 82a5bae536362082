"""The compiled pretrain step recompiles only when the phase changes the shapes, never per step: the masked
copies ride in the batch's own vision pass (fixed masked count per row), and the LAMB update is one graph
per kind of parameter group for every shape and step."""

import pytest
import torch

from conftest import TINY_MODEL, tiny_run
from pe_lightning.stages import load_stage_recipe
from pe_lightning.stages.phases import Phase
from pe_lightning.stages.pretrain import PretrainStage

pytestmark = pytest.mark.slow


def _batch(batch: int, resolution: int, context: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch, 3, resolution, resolution, generator=g),
            "text": torch.randint(1, 49406, (batch, context), generator=g)}


def test_no_recompiles_within_a_phase_and_no_graph_breaks(tiny_world, tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = load_stage_recipe("pretrain", tiny_run(tiny_world, tmp_path, "model.compile=true", *TINY_MODEL))
    stage = PretrainStage(cfg)
    stage.log = lambda *args, **kwargs: None  # no Trainer here: the step's logging is Lightning's business
    stage.log_scalars = lambda *args, **kwargs: None
    optimizer = stage.configure_optimizers()
    context = stage.model.context_length
    graphs_after_first_step = []
    for phase in (Phase(64, 16, 32), Phase(192, 32, 16)):
        for i in range(3):
            loss = stage.loss(_batch(phase.batch_size, phase.resolution, context, seed=i), phase)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            assert torch.isfinite(loss)
            if i == 0:
                graphs_after_first_step.append(counters["stats"]["unique_graphs"])
        assert counters["stats"]["unique_graphs"] == graphs_after_first_step[-1], (phase, dict(counters["stats"]))
    assert not counters["graph_break"], dict(counters["graph_break"])
