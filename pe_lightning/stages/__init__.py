"""The stages, by the names recipes and the pipeline use."""

from __future__ import annotations

from pe_lightning.stages.base import PEStage

# Every stage of the PE recipe, in pipeline order. Those without a class are not built yet.
STAGE_NAMES = ("pretrain", "video", "distill", "lang", "spatial")


class StageNotAvailable(RuntimeError):
    pass


def stage_class(name: str) -> type[PEStage]:
    """The LightningModule class of a stage, or a clear error for an unknown or not yet built stage."""
    if name == "pretrain":
        from pe_lightning.stages.pretrain import PretrainStage

        return PretrainStage
    if name in STAGE_NAMES:
        raise StageNotAvailable(f"stage {name!r} is part of the PE recipe but not available yet in this "
                                f"version of pe-lightning; available: ['pretrain']")
    raise StageNotAvailable(f"unknown stage {name!r}; the PE recipe's stages are {list(STAGE_NAMES)}")
