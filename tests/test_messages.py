"""A user's wrong inputs get a message that says what is wrong and the fix (issue #30)."""

import argparse
import os

import pytest
import torch

from pe_lightning.config import RecipeError
from pe_lightning.data.shards import DataError, ResolvedSource, expand_shards
from pe_lightning.data.stream import probe_source
from pe_lightning.models.checkpoint import CheckpointError, read_state_dict
from pe_lightning.run_length import check_run_length
from pe_lightning.stages import load_stage_recipe


def test_random_bytes_as_weights_are_not_called_pickled_objects(tmp_path):
    noise = tmp_path / "weights.pt"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as err:
        read_state_dict(noise)
    assert "pickled" not in str(err.value) and "not a PyTorch checkpoint" in str(err.value)
    assert "export/model.pt" in str(err.value)  # the fix: which file to give
    pickled = tmp_path / "pickled.pt"
    torch.save({"args": argparse.Namespace(lr=1)}, pickled)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_state_dict(pickled)


def test_an_empty_shard_folder_names_itself_in_the_example(tmp_path):
    with pytest.raises(DataError) as err:
        expand_shards(str(tmp_path))
    assert f"{tmp_path}/{{00000..00099}}.tar" in str(err.value) and "{url}" not in str(err.value)


def test_a_tar_of_random_bytes_is_called_unreadable_not_zero_samples(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(os.urandom(8192))
    with pytest.raises(DataError) as err:
        probe_source(ResolvedSource("mine", [str(shard)], 1.0, 100), decoder=None)
    assert "first 0 samples" not in str(err.value)
    assert f"{shard} is not a readable tar archive" in str(err.value) and "webdataset .tar" in str(err.value)


def test_total_samples_alone_names_the_keys_to_scale_and_the_given_fix_loads():
    with pytest.raises(RecipeError) as err:
        check_run_length(load_stage_recipe("pretrain", ["train.total_samples=8000"]))
    message = str(err.value)
    assert "train.phases end at 72000" in message and "optim.warmup_samples=4000" in message
    fix = message.split("scale them with it: ")[1]
    phases, warmup = fix.rsplit(" ", 1)
    cfg = load_stage_recipe("pretrain", ["train.total_samples=8000", phases.strip("'"), warmup])
    check_run_length(cfg)  # the pasted overrides fit
    assert cfg.optim.warmup_samples == 444 and cfg.train.phases[-1].until_samples is None


def test_a_warmup_longer_than_a_phaseless_run_is_named():
    with pytest.raises(RecipeError, match=r"optim.warmup_samples=640\).*optim.warmup_samples=5$"):
        check_run_length(load_stage_recipe("video", ["train.total_samples=100"]))


@pytest.mark.parametrize("last", ["None", "null"])
def test_until_samples_none_on_the_last_phase_is_accepted_on_the_command_line(last):
    phases = f"train.phases=[{{until_samples: 64, resolution: 16, batch_size: 32}}, {{until_samples: {last}, " \
             "resolution: 32, batch_size: 16}]"
    cfg = load_stage_recipe("pretrain", ["train.total_samples=192", "optim.warmup_samples=32", phases])
    assert cfg.train.phases[1].until_samples is None
    check_run_length(cfg)
