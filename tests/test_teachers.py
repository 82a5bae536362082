"""Mask-logit teachers (oracle, sam2) and the teacher cache (pe_lightning/teachers)."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pe_lightning.data.shapes.masks import MASK_EXT, decode_mask
from pe_lightning.data.shards import DataError, iter_tar_samples
from pe_lightning.data.transforms import eval_transform
from pe_lightning.data.image_text import decode_image
from pe_lightning.teachers import TeacherError, build_teacher, point_grid, resize_logits, teacher_names
from pe_lightning.teachers.cache import (
    INDEX_FILE,
    TeacherCache,
    build_cache,
    compress,
    cosine_gram,
    projection_matrix,
)
from pe_lightning.teachers.oracle import OracleTeacher

GRID, TOKENS, DIM = 8, 4, 32  # 64 prompts, a 4x4 token grid, projected to 32 channels


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pe_lightning.data.shapes.writer import generate_shapes_world

    root = tmp_path_factory.mktemp("world")
    generate_shapes_world(root, train=64, size=32, zeroshot_per_class=1, probe_per_class=1, retrieval=16,
                          video_train=8, video_test=8, instruct=8, instruct_test=8, shard_size=16, workers=1)
    return root / "train"


def _build(data, out, teacher=None, **kw):
    teacher = teacher or OracleTeacher(grid=GRID)
    args = dict(tokens=TOKENS, dim=DIM, batch_size=8, rank=0, world=1, teacher_args={"grid": GRID})
    args.update(kw)
    return build_cache(teacher, str(data), out, **args)


@pytest.fixture(scope="module")
def cache_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    _build(world, out)
    return out


def _samples(world, shard="00000.tar"):
    return list(iter_tar_samples(str(world / shard), lambda *a: pytest.fail(f"bad test shard: {a}")))


def _image_and_instance(raw):
    img = decode_image(raw)
    return eval_transform(img, img.width), torch.from_numpy(decode_mask(raw[MASK_EXT]).astype(np.int64))


# ---------------------------------------------------------------------------------------------- interface

def test_point_grid_cell_centres_row_major():
    pts = point_grid(2, 4)
    assert pts.tolist() == [[1.0, 1.0], [3.0, 1.0], [1.0, 3.0], [3.0, 3.0]]  # (x, y), x inner
    pts = point_grid(2, 4, 8)  # H = 4, W = 8
    assert pts[:, 0].tolist() == [2.0, 6.0, 2.0, 6.0] and pts[:, 1].tolist() == [1.0, 1.0, 3.0, 3.0]
    assert OracleTeacher.point_grid(32, 64).shape == (1024, 2)


def test_resize_logits_constant_and_flip_commute():
    x = torch.full((1, 3, 16, 16), -4.0)
    torch.testing.assert_close(resize_logits(x, 4), torch.full((1, 3, 4, 4), -4.0))
    y = torch.randn(2, 5, 32, 32)
    torch.testing.assert_close(resize_logits(y.flip(-1), (8, 8)), resize_logits(y, (8, 8)).flip(-1))
    # an 8x8 block average of a block-constant map is that constant (antialiased bilinear on logits)
    blocks = torch.arange(16.0).reshape(1, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert resize_logits(blocks, 4)[0, 0, 1, 2].item() == pytest.approx(6.0, abs=0.6)


def test_registry_names_and_unknown():
    assert {"oracle", "sam2"} <= set(teacher_names())
    assert isinstance(build_teacher("oracle", grid=4), OracleTeacher)
    with pytest.raises(TeacherError, match="unknown mask-logit teacher 'samm'.*oracle"):
        build_teacher("samm")


# ---------------------------------------------------------------------------------------------- oracle

def _toy_instances():
    inst = torch.zeros(1, 8, 8, dtype=torch.long)
    inst[0, 0:4, 0:4] = 1  # object 1: top-left block
    inst[0, 4:8, 4:8] = 2  # object 2: bottom-right block
    return inst


def test_oracle_point_inside_object_gives_its_mask_and_background_the_background():
    inst = _toy_instances()
    teacher = OracleTeacher(grid=2, magnitude=5.0)
    out = teacher(torch.zeros(1, 3, 8, 8), instance=inst)  # points (2,2) (6,2) (2,6) (6,6)
    assert out.shape == (1, 4, 8, 8)
    obj1, bg, obj2 = (inst[0] == 1), (inst[0] == 0), (inst[0] == 2)
    sign = lambda m: torch.where(m, 5.0, -5.0)  # noqa: E731
    torch.testing.assert_close(out[0, 0], sign(obj1))  # point (x=2, y=2) is inside object 1
    torch.testing.assert_close(out[0, 1], sign(bg))  # (6, 2): background -> the background mask
    torch.testing.assert_close(out[0, 2], sign(bg))  # (2, 6): background
    torch.testing.assert_close(out[0, 3], sign(obj2))  # (6, 6): object 2
    # a mask stored at another resolution is resized with nearest neighbour to the image
    big = inst.repeat_interleave(2, 1).repeat_interleave(2, 2)
    torch.testing.assert_close(teacher(torch.zeros(1, 3, 8, 8), instance=big), out)
    # resized output = resize of the full output (one map per region, resized once)
    torch.testing.assert_close(teacher(torch.zeros(1, 3, 8, 8), out_size=(4, 4), instance=inst),
                               resize_logits(out, (4, 4)))


def test_oracle_on_shapes_world_masks(world):
    raw = _samples(world)[0]
    image, inst = _image_and_instance(raw)
    objects = json.loads(raw["json"])["objects"]
    out = OracleTeacher(grid=16)(image[None], instance=inst[None])[0]  # [256, 32, 32]
    pts = point_grid(16, 32)
    for c in range(256):  # points sit on pixel boundaries (2-px cells): the pixel toward the centre counts
        x, y = int(pts[c, 0]), int(pts[c, 1])
        rid = inst[y if y < 16 else y - 1, x if x < 16 else x - 1]
        assert torch.equal(out[c] > 0, inst == rid)
    assert {int(o["id"]) for o in objects} >= set(inst.unique().tolist()) - {0}


def test_oracle_needs_masks():
    with pytest.raises(TeacherError, match="instance"):
        OracleTeacher(grid=2)(torch.zeros(1, 3, 8, 8))


def test_flip_policy_is_exact_for_the_oracle():
    """The flipped image's similarity matrix is the mirrored one (the reader's flip= follows it)."""
    inst = _toy_instances()
    inst[0, 5:7, 0:3] = 3
    inst[0, 0:2, 6:8] = 4  # every grid point sits on a pixel boundary (2-px cells)
    teacher = OracleTeacher(grid=4)
    feats = teacher(torch.zeros(1, 3, 8, 8), out_size=(4, 4), instance=inst)
    flipped = teacher(torch.zeros(1, 3, 8, 8), out_size=(4, 4), instance=inst.flip(-1))
    tok = lambda f: f.flatten(2).transpose(1, 2)  # noqa: E731
    torch.testing.assert_close(cosine_gram(tok(flipped)), cosine_gram(tok(feats.flip(-1))))


# ---------------------------------------------------------------------------------------------- sam2

SAM_SIZE = 64  # smallest multiple of 32 that keeps a 4x4 image embedding; Hiera rejects 48


@pytest.fixture(scope="module")
def sam_teacher():
    torch.manual_seed(0)
    return build_teacher("sam2", ckpt_path=None, random_weights=True, config="tiny", image_size=SAM_SIZE, grid=4,
                         chunk=5, device="cpu")


def test_sam2_random_tiny_gives_finite_point_logits(sam_teacher, world):
    images = torch.stack([_image_and_instance(r)[0] for r in _samples(world)[:2]])  # [2, 3, 32, 32]
    out = sam_teacher(images)
    assert out.shape == (2, 16, SAM_SIZE // 4, SAM_SIZE // 4) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() <= 32.0 and out.std() > 0
    assert not torch.allclose(out[0], out[1])  # the image matters
    assert not torch.allclose(out[0, 0], out[0, 15])  # the prompt matters
    # chunking over prompts changes nothing, and resizing inside the teacher = resizing its native output
    sam_teacher.chunk = 16
    try:
        torch.testing.assert_close(sam_teacher(images, out_size=(4, 4)), resize_logits(out, (4, 4)), atol=1e-4,
                                   rtol=1e-4)
    finally:
        sam_teacher.chunk = 5


def test_sam2_weights_are_required_and_checked(tmp_path):
    from pe_lightning.models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="needs SAM 2.1 weights"):
        build_teacher("sam2", config="tiny", image_size=SAM_SIZE, device="cpu")
    missing = tmp_path / "sam2.1_hiera_tiny.pt"
    with pytest.raises(CheckpointError, match=f"{missing} not found"):
        build_teacher("sam2", ckpt_path=str(missing), config="tiny", image_size=SAM_SIZE, device="cpu")
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"nope": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointError, match="does not match.*missing keys"):
        build_teacher("sam2", ckpt_path=str(bad), config="tiny", image_size=SAM_SIZE, device="cpu")
    with pytest.raises(TeacherError, match="multiple of 32"):
        build_teacher("sam2", random_weights=True, config="tiny", image_size=48, device="cpu")
    with pytest.raises(TeacherError, match="unknown SAM 2.1 config"):
        build_teacher("sam2", random_weights=True, config="huge", device="cpu")


@pytest.mark.slow
def test_sam2_loads_a_checkpoint_in_meta_layout(sam_teacher, tmp_path):
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sam_teacher.model.state_dict()}, path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = build_teacher("sam2", ckpt_path=str(path), config="tiny", image_size=SAM_SIZE, grid=4, device="cpu")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), sam_teacher(x))


# ---------------------------------------------------------------------------------------------- cache

def test_cache_companion_shards_keyed_like_the_data(world, cache_dir):
    for src in sorted(world.glob("*.tar")):
        data_keys = [r["__key__"] for r in _samples(world, src.name)]
        members = list(iter_tar_samples(str(cache_dir / src.name), lambda *a: pytest.fail(str(a))))
        assert [m["__key__"] for m in members] == data_keys
        assert all(set(m) == {"__key__", "__url__", "teacher.npy"} for m in members)
    index = json.loads((cache_dir / INDEX_FILE).read_text())
    assert index["complete"] and index["samples"] == 64 and len(index["shards"]) == 4
    assert index["stored_dim"] == DIM and index["tokens"] == TOKENS and index["grid"] == GRID


def test_cache_values_match_an_independent_recompute(world, cache_dir):
    cache = TeacherCache(cache_dir)
    raws = _samples(world, "00001.tar")[:3]
    got = cache.lookup([r["__key__"] for r in raws])
    assert got.shape == (3, TOKENS * TOKENS, DIM) and got.dtype == torch.float32
    proj = projection_matrix(GRID * GRID, DIM, 0)
    for raw, row in zip(raws, got):
        image, inst = _image_and_instance(raw)
        full = OracleTeacher(grid=GRID)(image[None], out_size=(TOKENS, TOKENS), instance=inst[None])
        tokens = full.flatten(2).transpose(1, 2)  # [1, 16, 64]
        torch.testing.assert_close(row, (tokens @ proj).half().float()[0])


def test_cache_measured_similarity_error_is_small_and_reported(world, cache_dir):
    index = json.loads((cache_dir / INDEX_FILE).read_text())
    recs = [json.loads((cache_dir / f"0000{i}.json").read_text()) for i in range(4)]
    # the index aggregates the per-shard figures (pair-weighted mean, max of maxes)
    pairs = sum(r["similarity_error"]["pairs"] for r in recs)
    mean = sum(r["similarity_error"]["mean_abs"] * r["similarity_error"]["pairs"] for r in recs) / pairs
    assert index["similarity_error"]["mean_abs"] == pytest.approx(mean)
    assert index["similarity_error"]["max"] == max(r["similarity_error"]["max"] for r in recs)
    assert pairs == 64 * 16 * 15
    # independent recompute for one shard, and JL-sized errors (dim 32: O(1/sqrt(32)) at worst)
    raws = _samples(world, "00002.tar")
    cache = TeacherCache(cache_dir)
    errs = []
    for raw in raws:
        image, inst = _image_and_instance(raw)
        full = OracleTeacher(grid=GRID)(image[None], out_size=(TOKENS, TOKENS), instance=inst[None])
        tok = full.flatten(2).transpose(1, 2)
        d = (cosine_gram(tok) - cosine_gram(cache.lookup([raw["__key__"]])))[0].abs()
        errs.append(d[~torch.eye(16, dtype=torch.bool)])
    errs = torch.cat(errs)
    assert recs[2]["similarity_error"]["mean_abs"] == pytest.approx(errs.mean().item(), rel=1e-4, abs=1e-6)
    assert recs[2]["similarity_error"]["max"] == pytest.approx(errs.max().item(), rel=1e-4, abs=1e-6)
    assert recs[2]["similarity_error"]["p99"] == pytest.approx(torch.quantile(errs, 0.99).item(), abs=2.5e-4)
    assert 0 < index["similarity_error"]["mean_abs"] < 0.05 and index["similarity_error"]["max"] < 0.6


def test_cosine_gram_is_the_loss_convention():
    from pe_lightning.stages.dense_losses import pairwise_similarity

    x = torch.randn(2, 9, 7)
    torch.testing.assert_close(cosine_gram(x), pairwise_similarity(x))


def test_unprojected_when_dim_covers_the_channels(world, tmp_path):
    summary = _build(world, tmp_path / "c", teacher=OracleTeacher(grid=4), dim=64, teacher_args={"grid": 4})
    e = summary["index"]["similarity_error"]
    assert summary["index"]["stored_dim"] == 16 and e["max"] < 2e-3  # fp16 rounding only
    assert projection_matrix(16, 64, 0) is None
    assert compress(torch.ones(1, 2, 16), None).dtype == torch.float16


def test_lookup_flip_mirrors_the_token_grid(world, cache_dir):
    cache = TeacherCache(cache_dir)
    keys = [r["__key__"] for r in _samples(world)[:2]]
    plain = cache.lookup(keys).reshape(2, TOKENS, TOKENS, DIM)
    mixed = cache.lookup(keys, flip=[True, False]).reshape(2, TOKENS, TOKENS, DIM)
    torch.testing.assert_close(mixed[0], plain[0].flip(1))
    torch.testing.assert_close(mixed[1], plain[1])
    with pytest.raises(ValueError, match="flip flags"):
        cache.lookup(keys, flip=[True])
    with pytest.raises(DataError, match="no entry for sample 'nope'"):
        cache.lookup(["nope"])
    assert cache.lookup([]).shape == (0, TOKENS * TOKENS, DIM)
    clone = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker gets: it reopens its own files
    torch.testing.assert_close(clone.lookup(keys), plain.flatten(1, 2))


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in sorted(Path(out).glob("0*"))}


def test_resume_rebuilds_only_the_deleted_shard(world, tmp_path):
    out = tmp_path / "c"
    _build(world, out)
    before = _mtimes(out)
    data = (out / "00002.tar").read_bytes()
    os.unlink(out / "00002.tar")
    summary = _build(world, out)
    assert summary["built"] == ["00002.tar"] and summary["skipped"] == 3
    after = _mtimes(out)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {"00002.tar", "00002.json"}
    assert (out / "00002.tar").read_bytes() == data  # deterministic rebuild


class _Interrupt(Exception):
    pass


class _DyingOracle(OracleTeacher):
    """Dies on its n-th call: a run killed in the middle of a shard."""

    def __init__(self, die_at, **kw):
        super().__init__(**kw)
        self.calls, self.die_at = 0, die_at

    def logits(self, *a, **kw):
        self.calls += 1
        if self.calls == self.die_at:
            raise _Interrupt
        return super().logits(*a, **kw)


def test_interrupted_run_resumes_where_it_stopped(world, tmp_path):
    out = tmp_path / "c"
    with pytest.raises(_Interrupt):  # batch 8 -> 2 calls per shard: dies inside the third shard
        _build(world, out, teacher=_DyingOracle(6, grid=GRID))
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert not list(out.glob(".*.tmp"))  # no half-written files
    before = _mtimes(out)
    with pytest.raises(DataError, match="00002.tar is missing"):
        TeacherCache(out)
    summary = _build(world, out)
    assert summary["built"] == ["00002.tar", "00003.tar"] and summary["skipped"] == 2
    assert all(_mtimes(out)[k] == v for k, v in before.items())
    assert summary["index"]["complete"] and len(TeacherCache(out)) == 64


def test_truncated_or_missing_cache_shard_is_a_clear_error(world, tmp_path):
    out = tmp_path / "c"
    _build(world, out)
    tar = out / "00001.tar"
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2)
    with pytest.raises(DataError, match=r"00001.tar is truncated.*rerun `pe-lightning teacher oracle"):
        TeacherCache(out)
    os.unlink(tar)
    with pytest.raises(DataError, match=r"00001.tar is missing"):
        TeacherCache(out)
    summary = _build(world, out)  # the truncated shard is not "finished": it is rebuilt
    assert summary["built"] == ["00001.tar"]
    assert len(TeacherCache(out)) == 64
    with pytest.raises(DataError, match="not a teacher cache"):
        TeacherCache(tmp_path)


def test_a_cache_folder_holds_one_setting(world, cache_dir):
    with pytest.raises(DataError, match=r"other settings \['dim'\]"):
        _build(world, cache_dir, dim=16)


def test_ranks_split_the_shards(world, tmp_path):
    out = tmp_path / "c"
    first = _build(world, out, rank=0, world=2)
    assert first["built"] == ["00000.tar", "00002.tar"] and not first["index"]["complete"]
    assert first["index"]["missing"] == ["00001.tar", "00003.tar"]
    second = _build(world, out, rank=1, world=2)
    assert second["built"] == ["00001.tar", "00003.tar"] and second["index"]["complete"]
    with pytest.raises(DataError, match="rank 2"):
        _build(world, out, rank=2, world=2)


def test_cli(world, tmp_path, capsys):
    from pe_lightning.models.checkpoint import CheckpointError
    from pe_lightning.teachers.cli import main

    out = tmp_path / "c"
    assert main(["oracle", "--data", str(world), "--out", str(out), "--grid", "4", "--tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "built 4 shards (64 images" in text and "similarity error" in text and "complete" in text
    assert TeacherCache(out).dim == 16
    with pytest.raises(CheckpointError, match="needs SAM 2.1 weights"):
        main(["sam", "--data", str(world), "--out", str(tmp_path / "s"), "--device", "cpu"])
    with pytest.raises(DataError, match="matched no files"):
        main(["oracle", "--data", str(tmp_path / "none/*.tar"), "--out", str(out)])


@pytest.mark.slow
def test_cli_sam_random_weights_builds_a_cache(world, tmp_path, capsys):
    from pe_lightning.teachers.cli import main

    out = tmp_path / "s"
    one = str(world / "00000.tar")
    assert main(["sam", "--data", one, "--out", str(out), "--config", "tiny", "--size", "64", "--grid", "4",
                 "--tokens", "4", "--random-weights", "--device", "cpu"]) == 0
    cache = TeacherCache(out)
    assert len(cache) == 16 and cache.dim == 16 and cache.settings.teacher == "sam2"
    assert torch.isfinite(cache.lookup([r["__key__"] for r in _samples(world)[:4]])).all()


def test_samples_without_a_mask_are_skipped_and_counted(world, tmp_path):
    import io
    import tarfile

    raws = _samples(world)[:3]
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tf:
        for i, raw in enumerate(raws):
            for ext in ("png", "json", MASK_EXT):
                if ext == MASK_EXT and i == 1:
                    continue  # the second sample has no mask
                data = raw[ext] if not (ext == MASK_EXT and i == 2) else b"not a png"
                ti = tarfile.TarInfo(f"{raw['__key__']}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    summary = _build(src, tmp_path / "c")
    assert summary["index"]["shards"][0]["skipped"] == {"missing_mask": 1, "bad_mask": 1}
    cache = TeacherCache(tmp_path / "c")
    assert len(cache) == 1 and raws[0]["__key__"] in cache
    with pytest.raises(DataError, match=f"no entry for sample '{raws[1]['__key__']}'"):
        cache.lookup([raws[1]["__key__"]])


# ---------------------------------------------------------------------------------------------- graded oracle (#29)

def test_edt_and_signed_distance_are_exact_up_to_the_limit():
    from pe_lightning.teachers.oracle import edt_to, signed_distance

    torch.manual_seed(0)
    targets = torch.rand(3, 13, 17) > 0.95
    targets[:, 6, 8] = True
    ys, xs = torch.meshgrid(torch.arange(13.0), torch.arange(17.0), indexing="ij")
    for b in range(3):
        pts = targets[b].nonzero().float()
        ref = ((ys[..., None] - pts[:, 0]) ** 2 + (xs[..., None] - pts[:, 1]) ** 2).sqrt().amin(-1)
        torch.testing.assert_close(edt_to(targets[b], 4.5), ref.clamp_max(4.5))
    square = torch.zeros(9, 9, dtype=torch.bool)
    square[2:7, 2:7] = True
    sd = signed_distance(square, 10.0)
    assert sd[4, 4] == 2.5 and sd[2, 4] == 0.5 and sd[1, 4] == -0.5 and sd[0, 4] == -1.5  # boundary between pixels


def test_graded_oracle_is_graded_local_and_follows_the_front_object():
    inst = torch.zeros(1, 32, 32, dtype=torch.long)
    inst[0, 4:20, 4:20] = 1  # a large square
    inst[0, 12:20, 12:20] = 2  # a second object in front of its corner: the instance map holds visible pixels
    teacher = OracleTeacher(grid=4, kind="graded", clip=0.1, radius=0.25, magnitude=10.0)
    out = teacher(torch.zeros(1, 3, 32, 32), instance=inst)[0]  # [16, 32, 32]; point c at ((c%4+.5)*8, (c//4+.5)*8)
    # point (4, 4) (c = 0) is on object 1: +m deep inside, 0 near its boundary, -m far away, and -m on object 2
    assert out[0, 8, 8] == pytest.approx(10.0) and out[0, 30, 30] == pytest.approx(-10.0)
    assert abs(float(out[0, 4, 10])) < 10.0 * 0.5 / 3.2 + 1e-6  # the first row inside: sd = 0.5 px, clip 3.2 px
    assert out[0, 16, 16] == pytest.approx(-10.0 * 3.5 / 3.2 if 3.5 < 3.2 else -10.0)
    assert torch.equal(out[0] > 0, inst[0] == 1)  # the sign is the front object's visible mask
    # point (20, 20) (c = 10) is on object 2, the front one: its own mask
    assert torch.equal(out[10] > 0, inst[0] == 2)
    # point (28, 28) (c = 15) is background: only the background within radius 8 px answers, not the far corner
    bg = out[15]
    assert bg[28, 28] > 0 and bg[30, 30] > 0
    assert bg[2, 28] == pytest.approx(-10.0) and bg[28, 2] == pytest.approx(-10.0)  # background, but far
    assert (bg[inst[0] > 0] < 0).all()
    # binary (the default) answers the whole background: far background corners are +m
    binary = OracleTeacher(grid=4)(torch.zeros(1, 3, 32, 32), instance=inst)[0]
    assert binary[15, 2, 28] == 10.0


def test_graded_oracle_target_has_a_higher_effective_rank_and_follows_flips(world):
    from pe_lightning.teachers.cache import effective_rank

    raws = _samples(world)
    images, insts = zip(*(_image_and_instance(r) for r in raws))
    images, insts = torch.stack(images), torch.stack(insts)
    tok = lambda f: f.flatten(2).transpose(1, 2)  # noqa: E731
    binary = tok(OracleTeacher(grid=GRID)(images, out_size=(TOKENS, TOKENS), instance=insts))
    graded_teacher = OracleTeacher(grid=GRID, kind="graded")
    graded = graded_teacher(images, out_size=(TOKENS, TOKENS), instance=insts)
    rb, rg = effective_rank(binary), effective_rank(tok(graded))
    assert rg.mean() > rb.mean() + 0.5 and (rg >= rb - 1e-3).all()
    one = torch.tensor([[1.0, 0.0]] * 3 + [[-1.0, 0.0]] * 2)[None]  # every token +-1 times one vector: rank 1
    assert effective_rank(one).item() == pytest.approx(1.0, abs=1e-5)
    assert effective_rank(torch.eye(6)[None]).item() == pytest.approx(6.0, abs=1e-4)
    flipped = graded_teacher(images.flip(-1), out_size=(TOKENS, TOKENS), instance=insts.flip(-1))
    torch.testing.assert_close(cosine_gram(tok(flipped)), cosine_gram(tok(graded.flip(-1))), atol=1e-4, rtol=0)


def test_cache_reports_the_target_effective_rank_beside_the_error(world, cache_dir, tmp_path, capsys):
    from pe_lightning.teachers.cache import effective_rank
    from pe_lightning.teachers.cli import main

    index = json.loads((cache_dir / INDEX_FILE).read_text())
    rec = json.loads((cache_dir / "00001.json").read_text())
    ranks = []
    for raw in _samples(world, "00001.tar"):
        image, inst = _image_and_instance(raw)
        full = OracleTeacher(grid=GRID)(image[None], out_size=(TOKENS, TOKENS), instance=inst[None])
        ranks.append(effective_rank(full.flatten(2).transpose(1, 2)))
    ranks = torch.cat(ranks)
    r = rec["target_effective_rank"]
    assert r["images"] == 16 and r["mean"] == pytest.approx(ranks.mean().item(), rel=1e-5)
    assert r["min"] == pytest.approx(ranks.min().item(), rel=1e-5) and r["max"] == pytest.approx(ranks.max().item())
    assert index["target_effective_rank"]["images"] == 64 and index["target_effective_rank"]["mean"] >= 1.0
    out = tmp_path / "graded"
    assert main(["oracle", "--data", str(world), "--out", str(out), "--grid", "4", "--tokens", "4",
                 "--kind", "graded"]) == 0
    assert "effective rank" in capsys.readouterr().out
    settings = json.loads((out / "cache.json").read_text())["settings"]
    assert settings["teacher_args"] == {"grid": 4, "magnitude": 10.0, "kind": "graded", "clip": 0.1, "radius": 0.25}
    binary = json.loads((cache_dir / "cache.json").read_text())["settings"]["teacher_args"]
    assert "kind" not in binary  # the binary oracle's settings are as before: existing caches stay valid
