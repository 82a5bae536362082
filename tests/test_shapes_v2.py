"""The shapes world, version 2 (#28), behind data.shapes_version / --version: version 1 unchanged; version 2
seeded and byte-identical, 1-5 occluding objects with exact z-ordered masks, textured fills and backgrounds,
partial captions with true relations, counting and relation questions, a dense-probe split whose token labels no
image-level label covers, and the probe's dense_set key."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_shapes import samples as samples_by_key  # {key: {ext: bytes}} of every tar under a folder

from pe_lightning.data import DataError
from pe_lightning.data.shapes import CLASSES, HELDOUT, ensure_shapes_world, generate_shapes_world
from pe_lightning.data.shapes.captions import relation
from pe_lightning.data.shapes.cli import main as shapes_cli
from pe_lightning.data.shapes.masks import decode_mask
from pe_lightning.data.shapes.scenes import COLOURS, SHAPES, Obj
from pe_lightning.data.shapes.world2 import BACKGROUNDS, FILLS, PLURAL, Obj2, _own_mask

V2 = dict(train=96, retrieval=8, zeroshot_per_class=1, video_train=4, video_test=2, instruct=48, instruct_test=8,
          probe_per_class=1, dense_train=24, dense_test=12, workers=1, world=2)
HELD = [f"{c} {s}" for c, s in HELDOUT]
NAME = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def samples(folder: Path) -> list[dict[str, bytes]]:
    return list(samples_by_key(folder).values())


def image(s: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))


def objects(meta: dict) -> list[Obj2]:
    return [Obj2(o["shape"], o["colour"], o["size"], o["cx"], o["cy"], o["r"], o["angle"], fill=o["fill"])
            for o in meta["objects"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_shapes_world(tmp_path_factory.mktemp("v2") / "shapes", seed=1, size=48, **V2)


# ------------------------------------------------------------------------------------------------------------
# version 1 stays as it was

def content_digest(root: Path) -> str:
    """Every member of every shard (images as decoded pixels, so the digest does not hang on the PNG encoder's
    version; mp4 clips left out: their bytes changed on purpose, see test_shapes_video_paths.py) and every other
    file (manifest, marker, sizes, class names)."""
    h = hashlib.sha256()
    for tar in sorted(root.rglob("*.tar")):
        h.update(str(tar.relative_to(root)).encode())
        with tarfile.open(tar) as tf:
            for m in tf:
                data = tf.extractfile(m).read()
                h.update(m.name.encode())
                if m.name.endswith(".png"):
                    im = Image.open(io.BytesIO(data))
                    h.update(im.mode.encode())
                    h.update(np.asarray(im).tobytes())
                elif not m.name.endswith(".mp4"):
                    h.update(data)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix != ".tar":
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_version_1_is_unchanged(tmp_path):
    # the digest of this world computed at 0e66506, before version 2 existed
    generate_shapes_world(tmp_path / "w", seed=5, size=48, train=24, retrieval=8, zeroshot_per_class=1,
                          video_train=4, video_test=2, instruct=8, instruct_test=4, probe_per_class=1, workers=1)
    assert content_digest(tmp_path / "w") == "72f2b4157f9a823889ffc559ecdc4d32b7efb993cb23afc8724350d48cabc30d"


# ------------------------------------------------------------------------------------------------------------
# version 2

def test_version_2_is_seeded_and_byte_identical(world, tmp_path):
    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    generate_shapes_world(tmp_path / "b", seed=1, size=48, **{**V2, "workers": 2})
    generate_shapes_world(tmp_path / "c", seed=1, size=48, **{**V2, "shard_size": 7})
    generate_shapes_world(tmp_path / "d", seed=2, size=48, **V2)
    assert digest(world) == digest(tmp_path / "b")  # every file, clips included, whatever the processes
    # sample by sample the same, whatever the sharding
    a = [(s["png"], s["txt"], s["json"], s["mask.png"]) for s in samples(world / "train")]
    c = [(s["png"], s["txt"], s["json"], s["mask.png"]) for s in samples(tmp_path / "c" / "train")]
    assert a == c and len(a) == 96
    assert digest(world)["train/00000.tar"] != digest(tmp_path / "d")["train/00000.tar"]  # the seed matters
    assert json.loads((world / ".complete").read_text())["world"] == 2
    m = json.loads((world / "manifest.json").read_text())
    assert m["world"] == 2 and m["splits"]["dense/test"]["samples"] == 12


def test_scenes_hold_1_to_5_occluding_objects_with_exact_z_ordered_masks(world):
    counts, fills, backgrounds, occluded = Counter(), Counter(), Counter(), 0
    for s in samples(world / "train") + samples(world / "retrieval"):
        meta, img, mask = json.loads(s["json"]), image(s), decode_mask(s["mask.png"])
        objs = objects(meta)
        counts[len(objs)] += 1
        backgrounds[meta["background"]["kind"]] += 1
        px = meta["size"]
        expect = np.zeros((px, px), np.uint8)
        for i, o in enumerate(objs, start=1):  # back to front
            expect[_own_mask(o, px)] = i
        assert np.array_equal(mask, expect)  # the mask is the z-ordered composition of the drawn shapes
        for i, (o, j) in enumerate(zip(objs, meta["objects"]), start=1):
            fills[o.fill] += 1
            under = img[mask == i].astype(int)
            area = int(_own_mask(o, px).sum())
            assert (mask == i).sum() >= 0.5 * area and abs((mask == i).sum() / area - j["visible"]) < 1e-3
            occluded += j["visible"] < 1
            rgb = np.array(o.rgb)
            if o.fill == "solid":
                assert (under == rgb).all()
            elif o.colour != "black":  # shaded / speckled: the same hue, darker by at most 30%
                assert (under <= rgb).all() and (under >= np.floor(0.69 * rgb)).all()
        bg = img[mask == 0]
        sat = (bg.max(1) - bg.min(1)) / np.maximum(bg.max(1), 1)
        assert sat.max() <= 0.31  # backgrounds stay muted
    assert set(counts) == {1, 2, 3, 4, 5} and set(fills) == set(FILLS) and set(backgrounds) == set(BACKGROUNDS)
    assert occluded >= 5


def test_captions_name_some_objects_and_every_claim_is_true(world):
    partial = relations = fronts = 0
    rel_re = re.compile(r"^an? (?:(?:small|large) )?(\w+ \w+) (left of|right of|above|below|in front of|behind) "
                        r"an? (?:(?:small|large) )?(\w+ \w+)[.,]")
    for s in samples(world / "train"):
        cap, meta = s["txt"].decode(), json.loads(s["json"])
        by_name = {f"{o['colour']} {o['shape']}": k for k, o in enumerate(meta["objects"])}
        named = {" ".join(m) for m in NAME.findall(cap)}
        assert named and named <= set(by_name), (cap, list(by_name))
        partial += len(named) < len(by_name)
        for word, n in (("two", 2), ("three", 3), ("four", 4), ("five", 5)):
            if f"{word} shapes" in cap:
                assert len(by_name) == n, cap
        m = rel_re.match(cap)
        if m:
            x, rel, y = m.groups()
            i, j = by_name[x], by_name[y]
            occ = {tuple(p) for p in meta["occludes"]}
            if rel == "in front of":
                assert (i + 1, j + 1) in occ
                fronts += 1
            elif rel == "behind":
                assert (j + 1, i + 1) in occ
            else:
                oi, oj = (Obj(o["shape"], o["colour"], o["size"], o["cx"], o["cy"], o["r"])
                          for o in (meta["objects"][i], meta["objects"][j]))
                assert relation(oi, oj, meta["size"]) == rel, cap
            relations += 1
    assert partial >= 10 and relations >= 5


def test_heldout_pairs_stay_out_of_training_and_the_zero_shot_sets_keep_their_meaning(world):
    pattern = re.compile("|".join(HELD))
    for split in ("train", "retrieval", "instruct", "instruct_test", "video/train", "video/test"):
        for s in samples(world / split):
            text = " ".join(s[e].decode() for e in ("txt", "json", "objects.json") if e in s)
            assert not pattern.search(text), text
    for style in ("test", "outline", "texture", "noise"):
        ss = samples(world / "zeroshot" / style / "test")
        assert len(ss) == 48 and {int(s["cls"]) for s in ss} == set(range(48))
        for s in ss:
            (o,) = json.loads(s["json"])["objects"]
            assert CLASSES[int(s["cls"])] == f"{o['colour']} {o['shape']}" and o["fill"] == "solid"
            assert json.loads(s["json"])["style"] == {"test": "solid"}.get(style, style)
    assert (world / "zeroshot" / "heldout_classes.txt").read_text().splitlines() == HELD


def test_qa_asks_counting_and_relation_questions_with_true_answers(world):
    kinds = Counter()
    for s in samples(world / "instruct"):
        meta, qa = json.loads(s["objects.json"]), json.loads(s["json"])
        objs = meta["objects"]
        assert any(q["question"].startswith("How many") for q in qa)
        for q in qa:
            text, ans = q["question"], q["answer"]
            if text == "How many shapes are there?":
                assert ans == ["zero", "one", "two", "three", "four", "five"][len(objs)]
                kinds["count"] += 1
            for shape, plural in PLURAL.items():
                if text == f"How many {plural} are there?":
                    n = sum(o["shape"] == shape for o in objs)
                    assert ans == ["zero", "one", "two", "three", "four", "five"][n]
                    kinds["count_shape"] += 1
            m = re.match(r"Which is in front, the (\w+ \w+) or the (\w+ \w+)\?", text)
            if m:
                ids = {f"{o['colour']} {o['shape']}": o["id"] for o in objs}
                front = ans[len("the "):]
                back = m.group(2) if front == m.group(1) else m.group(1)
                assert [ids[front], ids[back]] in meta["occludes"]
                kinds["front"] += 1
            m = re.match(r"Is the (\w+ \w+) left or right of the (\w+ \w+)\?", text)
            if m:
                o1, o2 = (next(o for o in objs if f"{o['colour']} {o['shape']}" == n) for n in m.groups())
                assert (o1["cx"] < o2["cx"]) == (ans == "left")
                kinds["left_right"] += 1
    assert kinds["count"] and kinds["count_shape"] and kinds["front"] and kinds["left_right"]


def test_dense_split_token_labels_differ_from_any_image_label(world):
    for split in ("train", "test"):
        ss = samples(world / "dense" / split)
        assert len(ss) == {"train": 24, "test": 12}[split]
        for s in ss:
            meta, mask = json.loads(s["json"]), decode_mask(s["mask.png"])
            objs = meta["objects"]
            shapes = [o["shape"] for o in objs]
            assert 3 <= len(objs) <= 5 and len(set(shapes)) == len(shapes)
            assert set(np.unique(mask)) == set(range(len(objs) + 1))  # every object visible
            ids, n = np.unique(mask[mask > 0], return_counts=True)
            assert int(s["cls"]) == objs[int(ids[np.argmax(n)]) - 1]["label"]  # the label: the largest object
    assert (world / "dense" / "classnames.txt").read_text().splitlines() == CLASSES


def test_the_version_is_part_of_the_world_s_identity(world, tmp_path):
    with pytest.raises(DataError, match="other parameters"):
        ensure_shapes_world(world, seed=1, size=48, **{**V2, "world": 1})
    assert ensure_shapes_world(world, seed=1, size=48, **V2) == world
    with pytest.raises(ValueError, match="version"):
        generate_shapes_world(tmp_path / "x", size=48, world=3)


def test_cli_version_2(tmp_path, capsys):
    args = ["--out", str(tmp_path / "o"), "--version", "2", "--train", "8", "--size", "32", "--retrieval", "4",
            "--zeroshot-per-class", "1", "--video-train", "2", "--video-test", "2", "--instruct", "4",
            "--dense-train", "4", "--dense-test", "4", "--workers", "1"]
    assert shapes_cli(args) == 0
    assert "dense/test" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["world"] == 2
    assert shapes_cli(args) == 0 and "nothing to do" in capsys.readouterr().out
    assert shapes_cli(args[:2] + args[4:]) == 1  # version 1 asked where a version 2 world is: refused


def test_recipe_key_selects_the_world(tmp_path, monkeypatch):
    import pe_lightning.data.shapes.writer as writer
    from pe_lightning.data import DataConfig, ImageTextDataModule
    from pe_lightning.stages import load_stage_recipe

    asked = []
    monkeypatch.setattr(writer, "ensure_shapes_world", lambda root, **kw: asked.append(kw))
    ImageTextDataModule(DataConfig(root=str(tmp_path), shapes_version=2, shapes_size=128), batch_size=16).ensure_data()
    ImageTextDataModule(DataConfig(root=str(tmp_path)), batch_size=16).ensure_data()
    assert [(k["world"], k["size"]) for k in asked] == [(2, 128), (1, 64)]
    cfg = load_stage_recipe("pretrain", ["data=shapes_v2"])  # the preset
    assert (cfg.data.shapes_version, cfg.data.shapes_size, cfg.data.root) == (2, 128, "data/shapes_v2")
    assert load_stage_recipe("pretrain", []).data.shapes_version == 1  # not the default


def test_probe_dense_set_multi_reads_the_dense_split(world, tmp_path):
    from pe_lightning.eval.probe_run import ProbeError, probe_export
    from pe_lightning.models import build_model

    result = probe_export(build_model("tiny", text=None), world, tmp_path / "p", layers=[2, 4], image_size=32,
                          device="cpu", dense_set="multi", dense_iter=5, lbfgs_iter=5)
    assert result["data"]["dense_set"] == str(world / "dense") and result["data"]["dense_train"] == 24
    assert result["data"]["train"] == 48 and result["data"]["dense_classes"] == ["background", *SHAPES]
    assert [d["layer"] for d in result["dense"]] == [2, 4]
    single = probe_export(build_model("tiny", text=None), world, tmp_path / "q", layers=[4], image_size=32,
                          device="cpu", dense_iter=5, lbfgs_iter=5)
    assert single["data"]["dense_set"] == str(world / "zeroshot" / "test")
    v1 = tmp_path / "v1"
    (v1 / "zeroshot" / "test").mkdir(parents=True)
    with pytest.raises(ProbeError, match="version 2"):
        probe_export(build_model("tiny", text=None), v1, tmp_path / "r", dense_set="multi", device="cpu")
