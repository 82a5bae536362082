"""Shared fixtures: a tiny shapes world and the recipe overrides of a tiny, seconds-long stage run."""

from __future__ import annotations

import pytest

from pe_lightning.data.testing import tiny_shapes_world

# A model and schedule small enough that a whole stage runs in seconds on 2 CPU cores. Two phases with
# different resolutions and batch sizes, so every run crosses a progressive-resolution boundary.
TINY_MODEL = ["model.vision.width=64", "model.vision.layers=2", "model.vision.heads=2",
              "model.vision.mlp_dim=128", "model.vision.output_dim=32", "model.vision.image_size=32",
              "model.text.width=64", "model.text.layers=1", "model.text.heads=2", "model.text.mlp_dim=128",
              "model.text.output_dim=32"]
TINY_SCHEDULE = ["train.total_samples=192", "optim.warmup_samples=32",
                 "train.phases=[{until_samples: 64, resolution: 16, batch_size: 32},"
                 " {until_samples: 192, resolution: 32, batch_size: 16}]",
                 "trainer.checkpoint_every_n_steps=2", "trainer.progress_bar=false", "train.log_every_n_steps=1"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return tiny_shapes_world(tmp_path_factory.mktemp("shapes") / "world")


def tiny_run(world, runs_dir, *extra: str) -> list[str]:
    """Overrides for a tiny pretrain run on the tiny world, written under runs_dir."""
    return [f"data.root={world}", "data.generate=false", "data.image_size=32", "data.workers=1",
            f"runs_dir={runs_dir}", "run=t", *TINY_MODEL, *TINY_SCHEDULE, *extra]


AFTER_STEP = '''
import os, lightning as L
class {name}(L.Callback):
    """{doc}"""
    def __init__(self, steps=3):
        self.steps = steps
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.steps:
            trainer.save_checkpoint(trainer.default_root_dir + "/checkpoints/last.ckpt")
            {action}
'''


def _after_step(folder, name: str, doc: str, action: str, steps: int) -> str:
    path = folder / f"{name.lower()}.py"
    path.write_text(AFTER_STEP.format(name=name, doc=doc, action=action))
    return f"{{name: '{path}:{name}', args: {{steps: {steps}}}}}"


def stop_after(folder, steps: int = 3) -> str:
    """A recipe callback entry (a user's callback file in `folder`) that stops a stage after `steps` steps with
    its checkpoint saved: the run then resumes as after a kill."""
    return _after_step(folder, "StopAfter", "Stops the fit after `steps` steps, after saving last.ckpt.",
                       "trainer.should_stop = True", steps)


def kill_after(folder, steps: int = 3) -> str:
    """A recipe callback entry that kill -9s the process right after the checkpoint of step `steps` is written
    (no clean shutdown at all)."""
    return _after_step(folder, "KillAt", "kill -9 right after the checkpoint of step `steps` is written.",
                       "os.kill(os.getpid(), 9)", steps)
