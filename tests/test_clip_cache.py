"""Teacher-embedding cache: the cached decoder's embeddings are the teacher's embeddings of the exact pixels
and caption it emits; building resumes shard by shard; missing, truncated or mismatched caches are clear
errors."""

import os

import pytest
import torch

from pe_lightning.data.cached_image_text import CachedImageTextDecoder
from pe_lightning.data.config import AugmentConfig
from pe_lightning.data.shards import DataError, ResolvedSource, expand_shards, iter_tar_samples
from pe_lightning.data.stream import META, StreamDataset, StreamSpec
from pe_lightning.data.transforms import TrainTransform
from pe_lightning.models import build_model, export_checkpoint, get_tokenizer
from pe_lightning.teachers.clip_cache import (MANIFEST, TeacherCacheError, augmentation_choice, build_clip_cache,
                                              cache_path, draw_augmentations, pack_params, read_cache_shard,
                                              teacher_fingerprint)
from pe_lightning.teachers.clip_cli import main as clip_main

SEED, N, PX = 7, 4, 32


def _teacher(seed: int = 0):
    """A random `tiny` teacher (the command rebuilds it from the preset name); run at 32 px."""
    torch.manual_seed(seed)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pe_lightning.data.shapes.writer import generate_shapes_world

    root = tmp_path_factory.mktemp("cache_world") / "w"
    generate_shapes_world(root, train=64, size=32, zeroshot_per_class=1, probe_per_class=1, retrieval=16,
                          video_train=8, video_test=8, instruct=8, instruct_test=8, shard_size=16, workers=1)
    return root


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    """The cache of the 4 train shards, built through the command's main()."""
    tmp = tmp_path_factory.mktemp("cache")
    teacher = _teacher()
    weights = export_checkpoint(teacher, tmp / "teacher.pt")
    out = tmp / "cache"
    argv = ["--data", str(world / "train"), "--out", str(out), "--weights", str(weights), "--model", "tiny",
            "--seed", str(SEED), "--num-augmentations", str(N), "--image-size", str(PX), "--device", "cpu",
            "--batch-size", "16"]
    assert clip_main(argv) == 0
    return {"out": out, "weights": weights, "teacher": teacher, "argv": argv,
            "shards": expand_shards(str(world / "train")), "fingerprint": teacher_fingerprint(weights)}


def _decoder(built, image_size=PX, **kw):
    kw.setdefault("teacher", built["fingerprint"])
    kw.setdefault("num_augmentations", N)
    return CachedImageTextDecoder(image_size, AugmentConfig(), get_tokenizer(32), kw.pop("seed", SEED),
                                  built["out"], keep_captions=True, **kw)


def _stream_chunks(decoder, shards, chunks=4, chunk_size=16):
    spec = StreamSpec(sources=[ResolvedSource(name="train", shards=shards, weight=1.0, size=64)], seed=SEED,
                      stream_seed=SEED, rank=0, world_size=1, streams=1, chunk_size=chunk_size, shuffle_buffer=8,
                      resampled=True)
    it = iter(StreamDataset(spec, decoder, 0, {}))
    out = []
    for _ in range(chunks):
        c = next(it)
        c.pop(META)
        out.append(c)
    return out


def _copy(built, tmp_path):
    import shutil

    dst = tmp_path / "cache"
    shutil.copytree(built["out"], dst)
    return {**built, "out": dst, "argv": [dst if a == str(built["out"]) else a for a in built["argv"]]}


def _argv(b):
    return [str(a) for a in b["argv"]]


# ---------------------------------------------------------------- the embeddings match the pixels

def test_cached_embeddings_are_the_teacher_embeddings_of_the_emitted_pixels(built):
    teacher, tok = built["teacher"], get_tokenizer(32)
    decoder = _decoder(built)
    chunks = _stream_chunks(decoder, built["shards"])
    flipped = 0
    with torch.no_grad():
        for c in chunks:
            assert c["teacher_image"].shape == (16, 128) and c["teacher_text"].shape == (16, 128)
            # recompute from exactly what the decoder emitted
            torch.testing.assert_close(teacher.encode_image(c["image"]), c["teacher_image"], atol=1e-5, rtol=0)
            torch.testing.assert_close(teacher.encode_text(tok(c["caption"])), c["teacher_text"], atol=1e-5, rtol=0)
            torch.testing.assert_close(c["text"], tok(c["caption"]))  # the student's tokens: the same caption
            flipped += sum(("left" in s or "right" in s) for s in c["caption"])
    assert flipped > 0  # captions with left/right were seen, so the flip-swapped variant was exercised
    assert decoder.teacher_logit_scale == pytest.approx(float(teacher.logit_scale.detach()))


def test_replay_uses_the_stored_augmentation_of_the_key_and_index(built):
    """augmentation j of key K comes from rng(seed, hash(K), j); the index only picks j."""
    url = built["shards"][1]
    cache = read_cache_shard(cache_path(built["out"], url))
    raw = next(iter_tar_samples(url, lambda *a: None))
    row = cache.row(raw["__key__"])
    w, h = cache.source_size[row].tolist()
    drawn = draw_augmentations(TrainTransform(AugmentConfig(), PX), SEED, raw["__key__"], w, h, N)
    assert cache.aug[row].tolist() == [pack_params(p) for p in drawn]
    assert len({tuple(map(tuple, cache.aug[row].tolist()))[j] for j in range(N)}) == N  # N distinct views
    # the same sample at two indices that pick the same j gives identical pixels and targets; other j differ
    decoder = _decoder(built)
    picks = {}
    for index in range(40):
        picks.setdefault(augmentation_choice(SEED, index, N), index)
    assert len(picks) == N
    a, b = decoder.decode(raw, picks[0]), decoder.decode(raw, picks[1])
    again = next(i for i in range(40, 400) if augmentation_choice(SEED, i, N) == 0)
    c = decoder.decode(raw, again)
    assert torch.equal(a["image"], c["image"]) and torch.equal(a["teacher_image"], c["teacher_image"])
    assert not torch.equal(a["image"], b["image"]) and not torch.equal(a["teacher_image"], b["teacher_image"])


def test_student_resolution_differs_from_the_teacher(built):
    """A 16 px student gets the teacher's embedding of the same augmentation at the teacher's 32 px."""
    teacher = built["teacher"]
    lo = _stream_chunks(_decoder(built, image_size=16), built["shards"], chunks=1)[0]
    hi = _stream_chunks(_decoder(built, image_size=PX), built["shards"], chunks=1)[0]
    assert lo["image"].shape[-1] == 16 and hi["image"].shape[-1] == PX
    assert lo["caption"] == hi["caption"]
    torch.testing.assert_close(lo["teacher_image"], hi["teacher_image"], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(teacher.encode_image(hi["image"]), lo["teacher_image"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- resume

def test_resume_rebuilds_only_the_deleted_file(built, tmp_path, capsys):
    b = _copy(built, tmp_path)
    files = {u: cache_path(b["out"], u) for u in b["shards"]}
    before = {u: (p.stat().st_mtime_ns, p.stat().st_ino) for u, p in files.items()}
    victim = b["shards"][2]
    saved = torch.load(files[victim], weights_only=True)
    files[victim].unlink()
    capsys.readouterr()
    assert clip_main(_argv(b)) == 0
    assert "built 1 shard(s)" in capsys.readouterr().out
    for u, p in files.items():
        now = (p.stat().st_mtime_ns, p.stat().st_ino)
        assert (now == before[u]) == (u != victim), u
    rebuilt = torch.load(files[victim], weights_only=True)
    assert rebuilt["keys"] == saved["keys"]
    for k in ("image", "text", "aug", "source_size"):
        assert torch.equal(rebuilt[k], saved[k]), k  # deterministic: the same file again
    # a complete cache: nothing to do
    assert clip_main(_argv(b)) == 0
    assert "built 0 shard(s)" in capsys.readouterr().out


# ---------------------------------------------------------------- errors

def test_truncated_file_is_an_error_naming_it_and_the_builder_repairs_it(built, tmp_path, capsys):
    b = _copy(built, tmp_path)
    path = cache_path(b["out"], b["shards"][0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherCacheError, match=rf"{path}.*truncated or corrupt.*delete it"):
        _stream_chunks(_decoder(b), b["shards"][:1], chunks=1)
    assert issubclass(TeacherCacheError, DataError)
    assert clip_main(_argv(b)) == 0  # the rerun notices and rebuilds it
    assert "built 1 shard(s)" in capsys.readouterr().out
    read_cache_shard(path, shard_url=b["shards"][0])


def test_missing_cache_file_and_missing_cache(built, tmp_path):
    b = _copy(built, tmp_path)
    path = cache_path(b["out"], b["shards"][3])
    path.unlink()
    with pytest.raises(TeacherCacheError, match=rf"{path} is missing \(the cache of shard .*00003.tar\)"):
        _stream_chunks(_decoder(b), b["shards"][3:], chunks=1)
    (b["out"] / MANIFEST).unlink()
    with pytest.raises(TeacherCacheError, match="no teacher cache at .*pe-lightning teacher clip"):
        _decoder(b)


@pytest.mark.parametrize("change, message", [
    (dict(seed=SEED + 1), f"seed: cache {SEED}, run {SEED + 1}"),
    (dict(num_augmentations=N + 1), f"num_augmentations: cache {N}, run {N + 1}"),
    (dict(teacher_image_size=64), "teacher_image_size: cache 32, run 64"),
    (dict(teacher="0" * 32), "teacher: cache"),
])
def test_a_cache_built_with_other_params_is_refused(built, change, message):
    with pytest.raises(TeacherCacheError, match=message.replace("(", r"\(")):
        _decoder(built, **change)


def test_other_augmentation_config_is_refused(built):
    with pytest.raises(TeacherCacheError, match="augment: cache"):
        CachedImageTextDecoder(PX, AugmentConfig(crop_scale_min=0.8), get_tokenizer(32), SEED, built["out"])


def test_builder_refuses_a_folder_with_other_params_and_duplicate_names(built, tmp_path):
    b = _copy(built, tmp_path)
    with pytest.raises(TeacherCacheError, match=f"num_augmentations: cache {N}, run {N + 2}"):
        build_clip_cache(b["shards"], b["out"], b["teacher"], teacher_id=b["fingerprint"], model="tiny", seed=SEED,
                         num_augmentations=N + 2, image_size=PX)
    other = tmp_path / "other"
    other.mkdir()
    twin = other / os.path.basename(b["shards"][0])
    twin.write_bytes(open(b["shards"][0], "rb").read())
    with pytest.raises(TeacherCacheError, match="several shards are named 00000.tar"):
        build_clip_cache([b["shards"][0], str(twin)], tmp_path / "c2", b["teacher"], teacher_id="x", model="tiny",
                         seed=SEED, num_augmentations=1)


def test_cli_errors(built, tmp_path):
    argv = _argv(_copy(built, tmp_path))
    bad = list(argv)
    bad[bad.index("--weights") + 1] = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        clip_main(bad)
    bad = list(argv) + ["--augment", "crop_scale=0.5"]
    with pytest.raises(ValueError, match="crop_scale_min"):
        clip_main(bad)
