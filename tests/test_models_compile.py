"""torch.compile of the vision tower reaches the entry points the stages call, and stays faithful.

Dynamo only (backend="eager"): no Inductor code generation, so this runs in seconds on CPU.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from pe_lightning.models import build_model
from pe_lightning.perf import tower_training_flops
from pe_lightning.stages import load_stage_recipe
from pe_lightning.stages.pretrain import PretrainStage


def test_compiled_tower_routes_forward_features_and_head():
    torch.manual_seed(0)
    model = build_model("tiny", vision={"use_mask_token": True})
    v = model.visual
    x = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 64) < 0.5
    with torch.no_grad():
        ref_tokens, ref_masked, ref_out = v.forward_features(x), v.forward_features(x, mask=mask), v(x)
    torch._dynamo.reset()
    counters.clear()
    v.compile(backend="eager", dynamic=False)
    assert v.is_compiled
    with torch.no_grad():
        tokens = v.forward_features(x)
        masked = v.forward_features(x, mask=mask)
        out = v(x)
        v.forward_head(tokens)
    # the stage's calls went through dynamo (nn.Module.compile alone would only catch __call__)
    assert counters["stats"]["unique_graphs"] >= 3
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(tokens, ref_tokens)
    torch.testing.assert_close(masked, ref_masked)
    torch.testing.assert_close(out, ref_out)
    # a deep copy (a frozen teacher) runs its own weights, not the original's
    twin = copy.deepcopy(v)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        assert twin.is_compiled
        assert not torch.allclose(twin(x), out)
        torch.testing.assert_close(v(x), out)
    torch._dynamo.reset()


def test_compiled_tower_trains():
    torch.manual_seed(0)
    model = build_model("tiny")
    twin = copy.deepcopy(model)
    model.visual.compile(backend="eager", dynamic=False)
    x = torch.randn(2, 3, 64, 64)
    model.encode_image(x).square().sum().backward()
    twin.encode_image(x).square().sum().backward()
    for (name, a), b in zip(model.visual.named_parameters(), twin.visual.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    torch._dynamo.reset()


def test_tower_flops_add_up():
    flops = tower_training_flops("tiny", 64)
    assert flops["vision"] > flops["text"] > 0
    cfg = load_stage_recipe("pretrain")  # its masked copies (mask regularization) cost vision passes too
    masked = cfg.pretrain.mask_reg.batch_fraction
    assert PretrainStage(cfg).flops_per_sample(64) == pytest.approx(flops["vision"] * (1 + masked) + flops["text"])
    # more pixels, more vision FLOPs; the text tower does not care
    bigger = tower_training_flops("tiny", 96)
    assert bigger["vision"] > flops["vision"] and bigger["text"] == flops["text"]
