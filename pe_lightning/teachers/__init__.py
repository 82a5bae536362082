"""Teachers of the spatial stage: mask-logit teachers behind one interface, and their cache.

- masklogits.py: the interface (`MaskLogitTeacher`: point grid -> [B, n*n, h, w] mask logits), the logit
  resize, the registry (`register_teacher`, `build_teacher`).
- oracle.py: `oracle`, exact per-point masks from the shapes world's instance maps (the embedded default).
- sam.py: `sam2`, SAM 2.1 through the installed `sam2` package (user-supplied weights).
- cache.py: companion-shard cache of the features (resized, projected, fp16) and its reader `TeacherCache`.
- cli.py: `pe-lightning teacher oracle|sam --data SHARDS --out DIR`.
"""

from pe_lightning.teachers.masklogits import (
    MaskLogitTeacher,
    TeacherError,
    build_teacher,
    point_grid,
    register_teacher,
    resize_logits,
    teacher_names,
)
from pe_lightning.teachers import oracle as _oracle  # noqa: F401  (registers "oracle")
from pe_lightning.teachers import sam as _sam  # noqa: F401  (registers "sam2"; imports sam2 only when built)

__all__ = ["MaskLogitTeacher", "TeacherError", "build_teacher", "point_grid", "register_teacher", "resize_logits",
           "teacher_names"]
