"""Rasterise scenes with PIL, without anti-aliasing: every shape pixel has exactly the shape's colour
(solid style), and the instance mask is drawn with the very same primitives, so it is exact."""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from pe_lightning.data.shapes.scenes import BOUND, Obj, Scene

STYLES = ("solid", "outline", "texture", "noise")


def _rot(points: list[tuple[float, float]], obj: Obj, scale: float = 1.0) -> list[tuple[float, float]]:
    a = math.radians(obj.angle)
    ca, sa = math.cos(a), math.sin(a)
    r = obj.r * scale
    return [(obj.cx + r * (x * ca - y * sa), obj.cy + r * (x * sa + y * ca)) for x, y in points]


def _regular(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360 * k / n)),
             radius * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]


def shape_points(obj: Obj, scale: float = 1.0) -> Optional[list[tuple[float, float]]]:
    """Polygon vertices in pixels (None for a circle). Unit shapes fit within BOUND."""
    s = obj.shape
    if s == "circle":
        return None
    if s == "square":
        h = 0.78
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif s == "triangle":
        pts = _regular(3, 1.1, -90)
    elif s == "hexagon":
        pts = _regular(6, 1.0, 0)
    elif s == "star":
        outer, inner = 1.1, 0.47
        pts = [(rad * math.cos(math.radians(-90 + 36 * k)), rad * math.sin(math.radians(-90 + 36 * k)))
               for k, rad in zip(range(10), [outer, inner] * 5)]
    elif s == "cross":
        a, e = 0.36, 1.0
        pts = [(-a, -e), (a, -e), (a, -a), (e, -a), (e, a), (a, a), (a, e), (-a, e), (-a, a), (-e, a), (-e, -a),
               (-a, -a)]
    else:
        raise ValueError(f"unknown shape {s}")
    assert all(math.hypot(x, y) <= BOUND + 1e-9 for x, y in pts)
    return _rot(pts, obj, scale)


def draw_shape(draw: ImageDraw.ImageDraw, obj: Obj, fill=None, outline=None, width: int = 1,
               scale: float = 1.0) -> None:
    pts = shape_points(obj, scale)
    if pts is None:
        r = obj.r * scale
        draw.ellipse([obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(pts, fill=fill, outline=outline, width=width)


@functools.lru_cache(maxsize=8)
def _grid(px: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / max(px - 1, 1)
    return yy - 0.5, xx - 0.5


def render_background(bg: dict, px: int) -> np.ndarray:
    if bg.get("kind") == "gradient":
        a = np.array(bg["from"], np.float32)
        b = np.array(bg["to"], np.float32)
        ang = math.radians(bg["angle"])
        yy, xx = _grid(px)
        t = xx * math.cos(ang) + yy * math.sin(ang)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        arr = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.broadcast_to(np.array(bg["colour"], np.uint8), (px, px, 3)).copy()


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    if max(rgb) < 60:  # black: a dark grey second stripe
        return (85, 85, 85)
    return tuple(int(c * 0.55) for c in rgb)  # type: ignore[return-value]


def render_scene(scene: Scene, rng: Optional[np.random.Generator] = None) -> tuple[Image.Image, Image.Image]:
    """(RGB image, L mask with instance ids 1..n, 0 = background)."""
    px = scene.size
    bg = render_background(scene.background, px)
    if scene.style == "noise":
        rng = rng if rng is not None else np.random.default_rng(0)
        noise = rng.normal(0, 45, bg.shape).round().astype(np.int16)
        bg = np.clip(bg.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    mask = Image.new("L", (px, px), 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    outline_w = max(2, px // 32)
    for i, obj in enumerate(scene.objects, start=1):
        if scene.style == "outline":
            draw_shape(draw, obj, outline=obj.rgb, width=outline_w)
            draw_shape(mdraw, obj, outline=i, width=outline_w)
        elif scene.style == "texture":
            own = Image.new("L", (px, px), 0)
            draw_shape(ImageDraw.Draw(own), obj, fill=1)
            m = np.asarray(own, dtype=bool)
            period = max(2, px // 21)
            yy, xx = np.mgrid[0:px, 0:px]
            stripe = ((xx + yy) // period) % 2 == 0
            arr = np.array(img)
            arr[m & stripe] = obj.rgb
            arr[m & ~stripe] = _shade(obj.rgb)
            img = Image.fromarray(arr, "RGB")
            draw = ImageDraw.Draw(img)
            draw_shape(mdraw, obj, fill=i)
        else:
            draw_shape(draw, obj, fill=obj.rgb)
            draw_shape(mdraw, obj, fill=i)
    return img, mask
