"""Motion clips: 8-16 frames of shapes moving, growing, shrinking or changing colour, with motion captions,
encoded as mp4 (H.264 via PyAV's libx264; mpeg4 as fallback) the way video2dataset stores clips."""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from pe_lightning.data.shapes.render import draw_shape, render_background
from pe_lightning.data.shapes.scenes import BOUND, SIZES, TRAIN_PAIRS, Obj, a, sample_background, sample_objects

MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "recolour", "still")
FRAME_COUNTS = (8, 12, 16)
FPS = 8


@dataclass
class Track:
    obj: Obj  # the object at the first frame
    motion: str
    dx: float = 0.0  # total displacement over the clip, pixels
    dy: float = 0.0
    scale_to: float = 1.0  # radius multiplier at the last frame
    colour_to: str = ""  # recolour: the colour from the middle frame on

    def at(self, t: float) -> Obj:
        """The object at clip time t in [0, 1]."""
        o = replace(self.obj, cx=self.obj.cx + self.dx * t, cy=self.obj.cy + self.dy * t,
                    r=self.obj.r * (1 + (self.scale_to - 1) * t))
        if self.motion == "recolour" and t >= 0.5:
            o = replace(o, colour=self.colour_to)
        return o

    def phrase(self) -> str:
        d = self.obj.describe()
        return {
            "left": f"{a(d)} moving to the left",
            "right": f"{a(d)} moving to the right",
            "up": f"{a(d)} moving up",
            "down": f"{a(d)} moving down",
            "grow": f"{a(d)} growing",
            "shrink": f"{a(d)} shrinking",
            "recolour": f"{a(d)} turning {self.colour_to}",
            "still": f"{a(d)} standing still",
        }[self.motion]


@dataclass
class Clip:
    size: int
    n_frames: int
    background: dict
    tracks: list[Track]

    def caption(self) -> str:
        return " and ".join(t.phrase() for t in self.tracks) + "."

    def to_json(self) -> dict:
        return {"size": self.size, "frames": self.n_frames, "fps": FPS, "background": self.background,
                "tracks": [{"motion": t.motion, "dx": round(t.dx, 3), "dy": round(t.dy, 3),
                            "scale_to": round(t.scale_to, 3), "colour_to": t.colour_to,
                            **t.obj.to_json(i + 1)} for i, t in enumerate(self.tracks)]}


def sample_clip(rng: np.random.Generator, px: int, pairs: Iterable[tuple[str, str]] = TRAIN_PAIRS) -> Clip:
    pairs = list(pairs)
    n_frames = int(rng.choice(FRAME_COUNTS))
    n = 1 if rng.random() < 0.6 else 2
    objs = sample_objects(rng, px, n, pairs, sizes=["small"] * n)
    tracks = []
    for k, o in enumerate(objs):
        motions = MOTIONS[:-1] if k == 0 else MOTIONS  # the first object always does something
        motion = str(rng.choice(motions))
        tr = Track(obj=o, motion=motion)
        b = BOUND * o.r
        travel = rng.uniform(0.3, 0.5) * px
        if motion in ("left", "right"):
            x0 = rng.uniform(b + 1, px - b - 1 - travel)
            tr.obj = replace(o, cx=float(x0 if motion == "right" else x0 + travel))
            tr.dx = float(travel if motion == "right" else -travel)
        elif motion in ("up", "down"):
            y0 = rng.uniform(b + 1, px - b - 1 - travel)
            tr.obj = replace(o, cy=float(y0 if motion == "down" else y0 + travel))
            tr.dy = float(travel if motion == "down" else -travel)
        elif motion == "grow":
            tr.scale_to = SIZES["large"] / SIZES["small"]
        elif motion == "shrink":
            tr.obj = replace(o, r=o.r * SIZES["large"] / SIZES["small"])
            tr.scale_to = SIZES["small"] / SIZES["large"]
        elif motion == "recolour":
            options = sorted({c for c, s in pairs if s == o.shape and c != o.colour})
            tr.colour_to = str(rng.choice(options))
        # keep growing shapes inside the frame
        big = BOUND * tr.obj.r * max(1.0, tr.scale_to)
        tr.obj = replace(tr.obj, cx=float(np.clip(tr.obj.cx, big + 1, px - big - 1)),
                         cy=float(np.clip(tr.obj.cy, big + 1, px - big - 1)))
        tracks.append(tr)
    return Clip(size=px, n_frames=n_frames, background=sample_background(rng), tracks=tracks)


def render_clip(clip: Clip) -> list[np.ndarray]:
    bg = render_background(clip.background, clip.size)
    frames = []
    for f in range(clip.n_frames):
        t = f / max(clip.n_frames - 1, 1)
        img = Image.fromarray(bg.copy(), "RGB")
        draw = ImageDraw.Draw(img)
        for tr in clip.tracks:
            o = tr.at(t)
            draw_shape(draw, o, fill=o.rgb)
        frames.append(np.asarray(img))
    return frames


def encode_mp4(frames: list[np.ndarray], fps: int = FPS) -> bytes:
    """RGB frames -> mp4 bytes (deterministic: the same bytes for the same frames, in any process)."""
    import av

    h, w = frames[0].shape[:2]
    last_error: Exception | None = None
    # x264's macroblock-tree rate control (on by default with CRF) gave different bytes for the same frames now
    # and then (~1 clip in 30, within one process), so two generations of one world differed, and so did what
    # trained on them: it is off, and each frame is converted and time-stamped here, not left to PyAV
    x264 = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
    for codec, opts in (("libx264", x264), ("mpeg4", {"qscale": "2"})):
        buf = io.BytesIO()
        try:
            with av.open(buf, "w", format="mp4") as c:
                s = c.add_stream(codec, rate=fps)
                s.width, s.height, s.pix_fmt = w, h, "yuv420p"
                s.options = opts
                for k, fr in enumerate(frames):
                    f = av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format="rgb24").reformat(format="yuv420p")
                    f.pts, f.time_base = k, Fraction(1, fps)
                    for p in s.encode(f):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
            return buf.getvalue()
        except Exception as e:  # codec not built into this PyAV: try the next one
            last_error = e
    raise RuntimeError(f"no usable mp4 encoder in PyAV: {last_error}")
