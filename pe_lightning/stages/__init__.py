"""The stage registry: name -> class. A new stage adds one line here (and its file, recipe and test).

The pipeline order and the parents of each stage are in recipes/pipeline.yaml; a stage named there but not
registered here is reported as "not available yet".
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pe_lightning.config import RECIPES_DIR, RecipeError, load_recipe
from pe_lightning.stages.base import PEStage
from pe_lightning.stages.distill import DistillStage
from pe_lightning.stages.lang import LangStage
from pe_lightning.stages.pretrain import PretrainStage
from pe_lightning.stages.spatial import SpatialStage
from pe_lightning.stages.video import VideoStage

STAGES: dict[str, type[PEStage]] = {
    "pretrain": PretrainStage,
    "distill": DistillStage,
    "lang": LangStage,
    "spatial": SpatialStage,
    "video": VideoStage,
}


class StageNotAvailable(RecipeError):
    """A stage name that is not registered."""


def stage_class(name: str) -> type[PEStage]:
    """The LightningModule class of a registered stage, or a clear error naming the registered ones."""
    if name not in STAGES:
        raise StageNotAvailable(f"stage {name!r} is not available in this version of pe-lightning; "
                                f"available stages: {sorted(STAGES)}")
    return STAGES[name]


def load_stage_recipe(stage: str, overrides: Optional[list[str]] = None, recipe: Optional[str] = None,
                      recipes_dir: Path = RECIPES_DIR):
    """The recipe of a registered stage, its own keys (`<stage>:`) checked against the stage's `Args`."""
    return load_recipe(stage, overrides, recipes_dir=recipes_dir, recipe=recipe, args=stage_class(stage).Args)


__all__ = ["STAGES", "PEStage", "StageNotAvailable", "stage_class", "load_stage_recipe"]
