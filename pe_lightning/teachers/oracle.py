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

`kind="graded"` (our choice; #29): the binary answer makes the target Gram matrix rank 1 on a one-object image
(every token is +-1 times one vector), which pushes all tokens of an image onto one direction. SAM 2.1's logits
are graded and local instead, and so is this kind:
- a prompt on an object answers that object's visible mask (the front object at the point: the instance map
  holds each object's visible pixels, so an occluded object answers its visible part, as SAM does for a
  click on it), with logits `m * clamp(sd / (clip * S), -1, 1)`, sd the signed distance (pixels, positive
  inside) to the mask's boundary, S the image side: deep inside +m, on the boundary 0, far outside -m;
- a prompt on background answers the background within `radius * S` of the point (a disc, as SAM answers
  a click on "stuff" with a local region rather than the whole complement), with the same graded logits of
  that region's signed distance, taken as `min(sd_background, radius * S - |x - p|)` (exact inside the
  region, a bound outside). The disc term is evaluated at the centres of the output grid's cells (it is
  1-Lipschitz, so resizing it first changes little); the background term is resized like every map.
Distances are measured on a working grid of at most 4x the output grid's side (a region covers a working
pixel when it holds at least half of its area), then the clipped logits are resized to the output grid like every map.
Signed distances are exact Euclidean distances between pixel centres up to the clip (a separable transform
over a window of the clip's width), shifted by half a pixel so that the boundary lies between the last pixel
inside and the first outside.

The embedded default teacher: SAM 2.1 weights cannot be downloaded here, and on the shapes world the oracle
is what SAM approximates. Logit resolution: the image's (the instance map is resized to H x W with
nearest neighbour when it differs).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from pe_lightning.teachers.masklogits import MaskLogitTeacher, TeacherError, register_teacher, resize_logits

__all__ = ["OracleTeacher", "signed_distance", "edt_to"]


@register_teacher("oracle")
class OracleTeacher(MaskLogitTeacher):
    """`OracleTeacher(grid=32, magnitude=10.0, kind="binary", clip=0.1, radius=0.25)(images, instance=[B, H', W']
    ints) -> [B, grid**2, H, W]` (module docstring)."""

    extras = ("instance",)
    KINDS = ("binary", "graded")

    def __init__(self, grid: int = 32, magnitude: float = 10.0, kind: str = "binary", clip: float = 0.1,
                 radius: float = 0.25):
        super().__init__(grid)
        if not float(magnitude) > 0:
            raise ValueError(f"oracle logit magnitude must be > 0, got {magnitude}")
        if kind not in self.KINDS:
            raise TeacherError(f"oracle kind {kind!r}: choose one of {list(self.KINDS)}")
        if not (float(clip) > 0 and float(radius) > 0):
            raise ValueError(f"oracle clip and radius must be > 0, got {clip}, {radius}")
        self.magnitude = float(magnitude)
        self.kind, self.clip, self.radius = kind, float(clip), float(radius)

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
        if self.kind == "graded":
            return self._graded(inst, points, ids_at_points, size)
        # a prompt's map depends only on the region id under it: one map per id, resized once (the resize is
        # linear and keeps constants, so resizing the +-m map = (2 * resized indicator - 1) * m)
        regions = F.one_hot(inst, int(inst.max()) + 1).permute(0, 3, 1, 2).float()  # [B, ids, H, W]
        maps = resize_logits(regions, size).mul_(2.0).sub_(1.0).mul_(self.magnitude)
        index = ids_at_points[:, :, None, None].expand(-1, -1, *size)
        return torch.gather(maps, 1, index)


    def _graded(self, inst: torch.Tensor, points: torch.Tensor, ids_at_points: torch.Tensor,
                size: tuple[int, int]) -> torch.Tensor:
        b, h, w = inst.shape
        # distances on a working grid of at most 4x the output's side: the logits are averaged down to the output
        # grid anyway, and the transform's cost falls ~8x per halving. A region there is where it covers at least
        # half of a working pixel (area weights: mirror-symmetric, so the flip policy still holds)
        work = (min(h, 4 * size[0]), min(w, 4 * size[1]))
        regions = F.one_hot(inst, int(inst.max()) + 1).permute(0, 3, 1, 2).float()  # [B, ids, H, W]
        if work != (h, w):
            regions = F.interpolate(regions, size=work, mode="area")
        regions = regions >= 0.5
        px = work[0] / h  # working pixels per image pixel
        scale = self.clip * max(h, w) * px
        sd = signed_distance(regions, scale + 1.0)  # working pixels, positive inside; exact to the clip
        maps = resize_logits((sd / scale).clamp_(-1.0, 1.0), size).mul_(self.magnitude)  # [B, ids, h', w']
        out = maps[torch.arange(b)[:, None], ids_at_points]  # [B, P, h', w']
        # background prompts: only the background within radius of the point (min of the two signed distances)
        ys = (torch.arange(size[0], dtype=torch.float32) + 0.5) * (h / size[0])
        xs = (torch.arange(size[1], dtype=torch.float32) + 0.5) * (w / size[1])
        dist = torch.sqrt((xs[None, None, :] - points[:, 0, None, None]) ** 2
                          + (ys[None, :, None] - points[:, 1, None, None]) ** 2)  # [P, h', w'] image pixels
        disc = ((self.radius * max(h, w) - dist) / (self.clip * max(h, w))).clamp_(-1.0, 1.0).mul_(self.magnitude)
        background = (ids_at_points == 0)[:, :, None, None]  # [B, P, 1, 1]
        return torch.where(background, torch.minimum(out, disc[None]), out)


def signed_distance(regions: torch.Tensor, limit: float) -> torch.Tensor:
    """`[..., H, W]` bool -> float32 signed Euclidean distance (pixels between pixel centres) to the region's
    boundary: inside `d(x, outside) - 0.5`, outside `-(d(x, inside) - 0.5)`, exact where |sd| <= `limit` - 0.5 and
    clamped to +-(`limit` - 0.5) beyond (the graded logits saturate there anyway)."""
    inside = edt_to(~regions, limit)  # distance of every pixel to the nearest pixel outside
    outside = edt_to(regions, limit)
    return torch.where(regions, inside - 0.5, 0.5 - outside)


def edt_to(targets: torch.Tensor, limit: float) -> torch.Tensor:
    """`[..., H, W]` bool -> float32 Euclidean distance of every pixel to the nearest True pixel, exact up to
    `limit` and clamped to it beyond: two separable passes of squared distances over offsets |d| <= ceil(limit)
    (a nearest pixel within `limit` lies within that window on both axes)."""
    r = int(math.ceil(float(limit)))
    big = float(2 * r * r + 1)
    lead, (h, w) = targets.shape[:-2], targets.shape[-2:]
    f = torch.where(targets, 0.0, big).float().reshape(-1, 1, h, w)
    padded = F.pad(f, (r, r, 0, 0), value=big)
    rows = f.clone()
    for d in range(-r, r + 1):
        rows = torch.minimum(rows, padded[..., :, r + d: r + d + w] + float(d * d))
    padded = F.pad(rows, (0, 0, r, r), value=big)
    out = rows.clone()
    for d in range(-r, r + 1):
        out = torch.minimum(out, padded[..., r + d: r + d + h, :] + float(d * d))
    return out.clamp_max_(float(limit) ** 2).sqrt_().reshape(*lead, h, w)


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
