"""The shapes world: a seeded generator of coloured-shape scenes, captions, masks, motion clips and QA,
written as webdataset shards in the formats the real readers take (see writer.py for the layout). Version 1
(scenes.py, render.py, captions.py, qa.py) is the default; version 2 (world2.py: multi-object, occluded,
textured scenes, partial captions, a dense-probe split) is chosen by data.shapes_version / --version."""

from pe_lightning.data.shapes.scenes import CLASSES, COLOURS, HELDOUT, SHAPES, SIZES, TEMPLATES, heldout_classes
from pe_lightning.data.shapes.writer import ensure_shapes_world, generate_shapes_world, is_complete

__all__ = ["CLASSES", "COLOURS", "HELDOUT", "SHAPES", "SIZES", "TEMPLATES", "heldout_classes",
           "ensure_shapes_world", "generate_shapes_world", "is_complete"]
