"""The shapes world: a seeded generator of coloured-shape scenes, captions, masks, motion clips and QA,
written as webdataset shards in the formats the real readers take (see writer.py for the layout)."""

from pe_lightning.data.shapes.scenes import CLASSES, COLOURS, HELDOUT, SHAPES, SIZES, TEMPLATES, heldout_classes
from pe_lightning.data.shapes.writer import ensure_shapes_world, generate_shapes_world, is_complete

__all__ = ["CLASSES", "COLOURS", "HELDOUT", "SHAPES", "SIZES", "TEMPLATES", "heldout_classes",
           "ensure_shapes_world", "generate_shapes_world", "is_complete"]
