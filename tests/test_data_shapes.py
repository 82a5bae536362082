"""The shapes world generator: determinism, held-out pairs, exact masks, truthful captions, layout, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pe_lightning.data import DataError
from pe_lightning.data.shapes import CLASSES, HELDOUT, ensure_shapes_world, generate_shapes_world
from pe_lightning.data.shapes.captions import relation
from pe_lightning.data.shapes.cli import main as shapes_cli
from pe_lightning.data.shapes.masks import decode_mask
from pe_lightning.data.shapes.scenes import COLOURS, Obj
from pe_lightning.data.testing import tiny_shapes_world

MICRO = dict(train=24, retrieval=8, zeroshot_per_class=1, video_train=4, video_test=2, instruct=8, workers=1)
HELD = [f"{c} {s}" for c, s in HELDOUT]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_shapes_world(tmp_path_factory.mktemp("world") / "shapes")


def samples(folder: Path):
    """All samples of the tars under `folder`: {key: {ext: bytes}}."""
    out: dict[str, dict[str, bytes]] = {}
    for tar in sorted(folder.rglob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                out.setdefault(f"{tar}:{key}", {})[ext] = tf.extractfile(m).read()
    return out


def test_layout_and_manifest(world):
    m = json.loads((world / "manifest.json").read_text())
    assert (world / ".complete").is_file()
    assert m["seed"] == 0 and m["size"] == 32 and m["zeroshot"]["heldout"] == HELD
    assert m["zeroshot"]["classes"] == CLASSES and len(CLASSES) == 48
    assert json.loads((world / "train" / "sizes.json").read_text()) and len(list((world / "train").glob("*.tar"))) >= 4
    for style in ("test", "outline", "texture", "noise"):
        d = world / "zeroshot" / style
        assert (d / "classnames.txt").read_text().splitlines() == CLASSES
        assert "{c}" in (d / "zeroshot_classification_templates.txt").read_text()
        assert int((d / "test" / "nshards.txt").read_text()) == len(list((d / "test").glob("*.tar")))
    assert (world / "zeroshot" / "heldout_classes.txt").read_text().splitlines() == HELD
    assert (world / "retrieval" / "dataset_type.txt").read_text().strip() == "retrieval"
    for split in ("video/train", "video/test", "instruct"):
        assert sum(json.loads((world / split / "sizes.json").read_text()).values()) == m["splits"][split]["samples"]


def test_generator_is_deterministic(tmp_path):
    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    generate_shapes_world(tmp_path / "a", seed=3, size=32, **MICRO)
    generate_shapes_world(tmp_path / "b", seed=3, size=32, **{**MICRO, "workers": 2, "shard_size": 5})
    generate_shapes_world(tmp_path / "c", seed=4, size=32, **MICRO)
    a, c = digest(tmp_path / "a"), digest(tmp_path / "c")
    assert a == digest(tmp_path / "a")  # stable
    assert a["train/00000.tar"] != c["train/00000.tar"]  # the seed matters
    # the samples are the same whatever the sharding and process count
    sa = {k.split(":")[1]: v for k, v in samples(tmp_path / "a" / "train").items()}
    sb = {k.split(":")[1]: v for k, v in samples(tmp_path / "b" / "train").items()}
    assert sa == sb and len(sa) == 24


def test_heldout_pairs_never_in_training_data(world):
    pattern = re.compile("|".join(HELD))
    n = 0
    for split in ("train", "retrieval", "instruct", "video/train", "video/test"):
        for key, s in samples(world / split).items():
            n += 1
            text = " ".join(s[e].decode() for e in ("txt", "json", "objects.json") if e in s)
            assert not pattern.search(text), (key, text)
            meta = json.loads(s.get("objects.json", s["json"]))
            for o in meta.get("objects", []) + meta.get("tracks", []):
                assert (o["colour"], o["shape"]) not in HELDOUT
                if o.get("colour_to"):
                    assert (o["colour_to"], o["shape"]) not in HELDOUT
    assert n > 300
    # ... but the zero-shot sets do test them
    labels = {int(s["cls"]) for s in samples(world / "zeroshot" / "test").values()}
    assert {CLASSES.index(h) for h in HELD} <= labels


def test_masks_match_the_drawn_shapes(world):
    checked = 0
    for key, s in list(samples(world / "train").items())[:120]:
        img = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        mask = decode_mask(s["mask.png"])
        objs = json.loads(s["json"])["objects"]
        assert mask.shape == img.shape[:2] and mask.max() == len(objs)
        shape_pixels = np.zeros(mask.shape, bool)
        for o in objs:
            under = img[mask == o["id"]]
            assert len(under) > 10
            assert (under == np.array(o["rgb"], np.uint8)).all(), key  # pixel colour under mask == shape colour
            shape_pixels |= (img == np.array(o["rgb"], np.uint8)).all(-1)
        assert np.array_equal(shape_pixels, mask > 0), key  # and nothing of that colour outside the masks
        checked += 1
    assert checked == 120


def test_masks_of_style_shift_sets(world):
    for style in ("outline", "texture"):
        s = next(iter(samples(world / "zeroshot" / style).values()))
        img = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        (o,) = json.loads(s["json"])["objects"]
        under = img[decode_mask(s["mask.png"]) == 1]
        assert len(under) > 5 and (under == np.array(o["rgb"], np.uint8)).all(-1).mean() > 0.3


def test_captions_are_true_and_compositional(world):
    singles = total = rels = 0
    rel_re = re.compile(r"^an? (?:(?:small|large) )?(\w+ \w+) (left of|right of|above|below) an? "
                        r"(?:(?:small|large) )?(\w+ \w+)\.$")
    for s in samples(world / "train").values():
        cap, meta = s["txt"].decode(), json.loads(s["json"])
        objs = {f"{o['colour']} {o['shape']}": o for o in meta["objects"]}
        total += 1
        singles += len(objs) == 1
        for name in re.findall(r"\b(" + "|".join(COLOURS) + r") (\w+)", cap):
            assert " ".join(name) in objs, (cap, list(objs))  # every named shape is in the image
        m = rel_re.match(cap)
        if m:
            a, rel, b = m.groups()
            oa, ob = (Obj(o["shape"], o["colour"], o["size"], o["cx"], o["cy"], o["r"]) for o in (objs[a], objs[b]))
            assert relation(oa, ob, meta["size"]) == rel, cap
            rels += 1
    assert 0.6 < singles / total < 0.8  # mostly single-shape scenes (70%), the rest compositional
    assert rels > 10


def test_motion_captions_match_tracks(world):
    for s in samples(world / "video" / "train").values():
        cap, meta = s["txt"].decode(), json.loads(s["json"])
        assert 8 <= meta["frames"] <= 16
        for t in meta["tracks"]:
            if t["motion"] == "right":
                assert t["dx"] > 0 and f"{t['colour']} {t['shape']} moving to the right" in cap
            if t["motion"] == "left":
                assert t["dx"] < 0 and f"{t['colour']} {t['shape']} moving to the left" in cap
            if t["motion"] == "grow":
                assert t["scale_to"] > 1 and "growing" in cap


def test_ensure_is_idempotent_atomic_and_checks_parameters(tmp_path, monkeypatch):
    root = tmp_path / "w"
    ensure_shapes_world(root, size=32, **MICRO)
    assert (root / ".complete").is_file() and not list(tmp_path.glob(".w.tmp-*"))
    import pe_lightning.data.shapes.writer as writer

    monkeypatch.setattr(writer, "generate_shapes_world", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_shapes_world(root, size=32, **MICRO) == root.resolve()
    with pytest.raises(DataError, match="other parameters"):
        ensure_shapes_world(root, size=32, **{**MICRO, "train": 25})
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="not a shapes world"):
        ensure_shapes_world(other, size=32, **MICRO)
    assert (other / "precious.txt").exists()


def test_cli(tmp_path, capsys):
    args = ["--out", str(tmp_path / "o"), "--train", "16", "--size", "32", "--retrieval", "4",
            "--zeroshot-per-class", "1", "--video-train", "2", "--video-test", "2", "--instruct", "4",
            "--workers", "1"]
    assert shapes_cli(args) == 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "held out: red star" in out
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["counts"]["train"] == 16
    assert shapes_cli(args) == 0  # already there with these parameters: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert shapes_cli(args[:-2] + ["--seed", "1", "--workers", "1"]) == 1  # refuses to overwrite another world
    assert "--force" in capsys.readouterr().err
    assert shapes_cli(args + ["--seed", "1", "--force"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["seed"] == 1
