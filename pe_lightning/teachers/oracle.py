"""`oracle`: the mask logits a perfect point-prompted segmenter would give, from the shapes world's exact masks.

For the prompt at point p (see masklogits.point_grid) on an image whose instance map is I (`{key}.mask.png`:
0 = background, i = the i-th object, data/shapes/masks.py), the answer is the mask of the region p falls in:
a point inside an object -> that object's mask, a point on background -> the background mask; as logits,
`+m` inside that mask and `-m` outside, with a fixed magnitude m (`magnitude`, default 10: our choice; the
pairwise cosine similarities the spatial loss uses do not depend on m). The point's region is the instance
id of the pixel that contains it; a point on a pixel boundary (the default 32x32 grid on 64 px puts every
point on one) takes the pixel on the side of the image centre, a mirror-symmetric rule, so the oracle's
answer for a horizontally flipped image is exactly the mirrored answer (for an even grid, whose points
avoid the centre line), as the cache's flip policy assumes.

The embedded default teacher: SAM 2.1 weights cannot be downloaded here, and on the shapes world the oracle
is what SAM approximates. Logit resolution: the image's (the instance map is resized to H x W with
nearest neighbour when it differs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pe_lightning.teachers.masklogits import MaskLogitTeacher, TeacherError, register_teacher, resize_logits

__all__ = ["OracleTeacher"]


@register_teacher("oracle")
class OracleTeacher(MaskLogitTeacher):
    """`OracleTeacher(grid=32, magnitude=10.0)(images, instance=[B, H', W'] ints) -> [B, grid**2, H, W]`."""

    extras = ("instance",)

    def __init__(self, grid: int = 32, magnitude: float = 10.0):
        super().__init__(grid)
        if not float(magnitude) > 0:
            raise ValueError(f"oracle logit magnitude must be > 0, got {magnitude}")
        self.magnitude = float(magnitude)

    def logits(self, images: torch.Tensor, points: torch.Tensor, out_size: Optional[tuple[int, int]],
               instance: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
        b, _, h, w = images.shape
        if instance is None:
            raise TeacherError("the oracle teacher needs the exact instance masks: pass instance=[B, H, W] "
                               "(the samples' .mask.png); use the sam2 teacher for data without masks")
        inst = _instances_at(instance, b, h, w)
        col, row = _pixel_index(points[:, 0], w), _pixel_index(points[:, 1], h)
        ids_at_points = inst[:, row, col]  # [B, P]
        size = out_size or (h, w)
        # a prompt's map depends only on the region id under it: one map per id, resized once (the resize is
        # linear and keeps constants, so resizing the +-m map = (2 * resized indicator - 1) * m)
        regions = F.one_hot(inst, int(inst.max()) + 1).permute(0, 3, 1, 2).float()  # [B, ids, H, W]
        maps = resize_logits(regions, size).mul_(2.0).sub_(1.0).mul_(self.magnitude)
        index = ids_at_points[:, :, None, None].expand(-1, -1, *size)
        return torch.gather(maps, 1, index)


def _pixel_index(coord: torch.Tensor, extent: int) -> torch.Tensor:
    """The pixel holding each continuous coordinate; on a boundary, the pixel toward the image centre."""
    toward_centre = torch.where(coord < extent / 2, coord.floor(), coord.ceil() - 1)
    return toward_centre.long().clamp(0, extent - 1)


def _instances_at(instance: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    instance = torch.as_tensor(instance)
    if instance.ndim != 3 or instance.shape[0] != b:
        raise TeacherError(f"oracle: instance masks must be [B={b}, H, W], got {tuple(instance.shape)}")
    inst = instance.long()
    if tuple(inst.shape[-2:]) != (h, w):
        # nearest-exact = pixel-centre sampling, the same as PIL's NEAREST used by the mask loaders
        inst = F.interpolate(inst[:, None].float(), size=(h, w), mode="nearest-exact")[:, 0].long()
    return inst
