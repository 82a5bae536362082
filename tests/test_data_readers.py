"""Readers on real shards: image-text, video-text, zero-shot, retrieval, instruction; sizes; bad data; errors;
transforms (Meta's eval preprocessing, seeded augmentation, truthful flips)."""

from __future__ import annotations

import functools
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from open_clip.tokenizer import tokenize as clip_tokenize
from PIL import Image

from pe_lightning.data import (AugmentConfig, DataConfig, DataError, ImageTextDataModule, InstructionDataModule,
                               SourceConfig, VideoTextDataModule, discover_size, eval_transform, expand_shards,
                               load_classification_set, load_retrieval_set, swap_left_right)
from pe_lightning.data.image_text import ImageTextDecoder
from pe_lightning.data.instruction import InstructionDecoder
from pe_lightning.data.shapes.motion import encode_mp4
from pe_lightning.data.testing import png_bytes, tiny_shapes_world, write_image_text_shards, write_tar
from pe_lightning.data.transforms import TrainTransform, sample_rng
from pe_lightning.data.video_text import decode_video_frames, uniform_indices

TOKENIZE = functools.partial(clip_tokenize, context_length=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_shapes_world(tmp_path_factory.mktemp("world") / "shapes")


def cfg_for(world, **kw) -> DataConfig:
    base = dict(root=str(world), generate=False, image_size=32, workers=0, chunk_size=4, shuffle_buffer=16)
    base.update(kw)
    return DataConfig(**base)


# ---------------- readers on the shapes world ----------------

def test_image_text_reader_on_generated_shards(world):
    dm = ImageTextDataModule(cfg_for(world, workers=2), tokenize=TOKENIZE, batch_size=8, keep_captions=True)
    loader = dm.train_dataloader()
    assert len(loader) == 256 // 8
    b = next(iter(loader))
    assert b["image"].shape == (8, 3, 32, 32) and b["text"].shape == (8, 16)
    assert all(isinstance(c, str) and c for c in b["caption"])
    assert torch.equal(b["text"], TOKENIZE(b["caption"]))  # the text is the (flip-corrected) caption
    assert dm.skipped() == {}


def test_video_reader_yields_clips(world):
    dm = VideoTextDataModule(cfg_for(world, num_frames=8), tokenize=TOKENIZE, batch_size=4, keep_captions=True)
    b = next(iter(dm.train_dataloader()))
    assert b["video"].shape == (4, 8, 3, 32, 32) and b["video"].dtype == torch.float32
    assert b["text"].shape == (4, 16)
    assert all(any(w in c for w in ("moving", "growing", "shrinking", "turning")) for c in b["caption"])
    assert not torch.equal(b["video"][:, 0], b["video"][:, -1])  # frames differ: it moves


def test_short_clip_repeats_frames():
    assert uniform_indices(3, 8) == [0, 0, 0, 0, 1, 1, 1, 2]  # Meta: int(i*(T-1)/(N-1)), ends included
    assert uniform_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 15]
    frames = [np.full((32, 32, 3), v, np.uint8) for v in (10, 120, 240)]
    got = decode_video_frames(encode_mp4(frames), 8)
    assert len(got) == 8
    means = [int(round(np.asarray(f).mean())) for f in got]
    assert means[:4] == [means[0]] * 4 and means[4:7] == [means[4]] * 3
    assert abs(means[0] - 10) < 8 and abs(means[-1] - 240) < 8


def test_zero_shot_set_in_clip_benchmark_layout(world):
    loader, classnames, templates = load_classification_set(world / "zeroshot" / "test", image_size=32,
                                                            batch_size=32)
    assert len(classnames) == 48 and classnames[0] == "red circle"
    assert "a photo of a {c}." in templates
    labels = torch.cat([y for _, y in loader])
    assert sorted(set(labels.tolist())) == list(range(48))
    assert len(labels) == 96  # 2 per class
    x, _ = next(iter(loader))
    assert x.shape[1:] == (3, 32, 32)
    heldout = (world / "zeroshot" / "heldout_classes.txt").read_text().split("\n")[:6]
    assert all(h in classnames for h in heldout)
    for style in ("outline", "texture", "noise"):
        _, names, _ = load_classification_set(world / "zeroshot" / style, 32, 16)
        assert names == classnames


def test_retrieval_set(world):
    loader = load_retrieval_set(world / "retrieval", image_size=32, batch_size=16)
    n = 0
    for images, captions in loader:
        assert images.shape[0] == len(captions)
        assert all(isinstance(c, list) and c and all(isinstance(s, str) for s in c) for c in captions)
        n += len(captions)
    assert n == 64


def test_instruction_reader(world):
    dm = InstructionDataModule(cfg_for(world), batch_size=4)
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (4, 3, 32, 32)
    assert len(b["turns"]) == 4
    for turns in b["turns"]:
        assert turns and all(set(t) == {"question", "answer"} and t["question"] and t["answer"] for t in turns)


# ---------------- shard lists and sizes ----------------

def test_sizes_from_sizes_json_stats_json_and_recipe_key(tmp_path):
    a = write_image_text_shards(tmp_path / "a", 3, 5, sizes="sizes.json")
    b = write_image_text_shards(tmp_path / "b", 2, 7, sizes="stats")
    c = write_image_text_shards(tmp_path / "c", 2, 4, sizes=None)
    assert discover_size(a) == (15, "sizes.json")
    assert discover_size(b) == (14, "*_stats.json")
    assert discover_size(c, explicit=8)[0] == 8
    with pytest.raises(DataError) as e:
        discover_size(c)
    msg = str(e.value)
    assert "sizes.json" in msg and "_stats.json" in msg and "size" in msg and str(tmp_path / "c") in msg
    # the datamodule reads them the same way: 15 + 14 samples
    cfg = DataConfig(train=[SourceConfig(urls=str(tmp_path / "a" / "{00000..00002}.tar")),
                            SourceConfig(urls=str(tmp_path / "b" / "*.tar"))], workers=0, chunk_size=1,
                     image_size=16)
    dm = ImageTextDataModule(cfg, tokenize=TOKENIZE)
    dm.setup()
    assert dm.samples_per_epoch == 29


def test_shard_expansion_and_clear_errors(tmp_path):
    write_image_text_shards(tmp_path, 3, 2)
    assert len(expand_shards(str(tmp_path / "{00000..00002}.tar"))) == 3
    assert len(expand_shards(str(tmp_path / "*.tar"))) == 3
    assert len(expand_shards(str(tmp_path))) == 3
    assert len(expand_shards(f"{tmp_path}/00000.tar::{tmp_path}/00001.tar")) == 2
    with pytest.raises(DataError, match=r"1 of 4 shards not found: .*00003\.tar"):
        expand_shards(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(DataError, match=r"matched no files"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    cfg = DataConfig(train=[SourceConfig(urls=str(tmp_path / "missing" / "{0..3}.tar"))], workers=0)
    with pytest.raises(DataError, match="not found"):
        ImageTextDataModule(cfg, tokenize=TOKENIZE).train_dataloader()
    with pytest.raises(DataError, match="no shapes world"):
        ImageTextDataModule(DataConfig(root=str(tmp_path / "none"), generate=False), tokenize=TOKENIZE).setup()


# ---------------- bad data ----------------

def _bad_shard(path, n=24):
    samples = []
    for i in range(n):
        s = {"__key__": f"{i:04d}", "png": png_bytes((10 * i % 256, 50, 90)), "txt": f"item {i}".encode()}
        if i == 2:
            s["png"] = b"\x89PNG garbage"  # undecodable image
        if i == 5:
            del s["txt"]  # missing caption
        if i == 7:
            s["txt"] = b"   "  # empty caption
        if i == 9:
            del s["png"]  # no image at all
        samples.append(s)
    write_tar(path, samples)


def test_bad_samples_are_skipped_and_counted_across_workers(tmp_path):
    for k in range(2):
        _bad_shard(tmp_path / f"{k:05d}.tar")
    # a third shard that breaks off in the middle (truncated archive)
    _bad_shard(tmp_path / "00002.tar")
    raw = (tmp_path / "00002.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(raw[: len(raw) // 2 + 100])
    cfg = DataConfig(train=[SourceConfig(urls=str(tmp_path / "*.tar"), size=72)], workers=2, chunk_size=4,
                     image_size=16, shuffle_buffer=0, resampled=False)
    dm = ImageTextDataModule(cfg, tokenize=TOKENIZE, batch_size=8, keep_captions=True)
    caps = []
    for b in dm.train_dataloader():  # one pass
        caps += b["caption"]
    skipped = dm.skipped()
    assert skipped["bad_image"] >= 2 and skipped["missing_caption"] >= 2 and skipped["empty_caption"] >= 2
    assert skipped["missing_image"] >= 2 and skipped["tar_error"] >= 1
    assert not {"item 2", "item 5", "item 7", "item 9"} & set(caps)


def test_broken_tar_member_header_is_counted(tmp_path, caplog):
    _bad_shard(tmp_path / "00000.tar", n=12)
    raw = bytearray((tmp_path / "00000.tar").read_bytes())
    # overwrite the header of the 15th member with garbage: tar stops there, the reader notices
    off = 0
    for _ in range(14):
        size = int(raw[off + 124: off + 136].rstrip(b"\0 ") or b"0", 8)
        off += 512 + (size + 511) // 512 * 512
    raw[off: off + 100] = b"Z" * 100
    (tmp_path / "00000.tar").write_bytes(bytes(raw))
    cfg = DataConfig(train=[SourceConfig(urls=str(tmp_path / "00000.tar"), size=12)], workers=0, chunk_size=2,
                     image_size=16, shuffle_buffer=0, resampled=False)
    dm = ImageTextDataModule(cfg, tokenize=TOKENIZE, batch_size=2)
    caplog.set_level(logging.WARNING)
    it = iter(dm.train_dataloader())
    for _ in range(6):
        next(it)
    assert dm.skipped().get("tar_error", 0) >= 1
    assert "skipped sample (tar_error)" in caplog.text and "corrupt header" in caplog.text


def test_zero_usable_samples_is_a_clear_error(tmp_path):
    write_tar(tmp_path / "00000.tar", [{"__key__": f"{i:03d}", "png": b"junk", "txt": b"x"} for i in range(5)])
    cfg = DataConfig(train=[SourceConfig(urls=str(tmp_path / "00000.tar"), size=5)], workers=0)
    with pytest.raises(DataError, match=r"no usable sample.*bad_image: 5"):
        ImageTextDataModule(cfg, tokenize=TOKENIZE).setup()


# ---------------- transforms ----------------

def test_eval_transform_is_metas_preprocessing():
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    meta = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(),
                      T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    torch.testing.assert_close(eval_transform(img, 32), meta(img), atol=1e-6, rtol=0)


def test_augmentation_is_seeded_per_sample_index():
    t = TrainTransform(AugmentConfig(), 24)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    a, _ = t(img, sample_rng(0, 17))
    b, _ = t(img, sample_rng(0, 17))
    c, _ = t(img, sample_rng(0, 18))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 24, 24) and a.min() >= -1 and a.max() <= 1


def test_swap_left_right():
    assert swap_left_right("a red circle left of a blue square.") == "a red circle right of a blue square."
    assert swap_left_right("Left, RIGHT, leftmost, upright, copyright") == "Right, LEFT, rightmost, upright, copyright"
    assert swap_left_right("from left to right") == "from right to left"


FLIP_ONLY = AugmentConfig(crop_scale_min=1.0, crop_scale_max=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0,
                          brightness=0.0, saturation=0.0, hflip=1.0)


def test_flip_swaps_left_and_right_in_caption_and_image():
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :8] = (255, 0, 0)  # red on the left
    raw = {"__key__": "k", "png": _png(img), "txt": b"a red half left of a black half."}
    dec = ImageTextDecoder(16, FLIP_ONLY, None, seed=0)
    out = dec.decode(raw, index=3)
    assert out["caption"] == "a red half right of a black half."
    assert out["image"][0, :, -1].min() == 1.0 and out["image"][0, :, 0].max() == -1.0  # red is now on the right
    ref = ImageTextDecoder(16, AugmentConfig(enabled=False), None, seed=0).decode(raw, index=3)
    assert torch.equal(out["image"], ref["image"].flip(-1))
    assert ref["caption"] == "a red half left of a black half."


def test_flip_swaps_instruction_turns():
    turns = [{"question": "Is the circle left or right of the square?", "answer": "left"}]
    raw = {"__key__": "k", "png": png_bytes((1, 2, 3)), "json": json.dumps(turns).encode()}
    out = InstructionDecoder(16, FLIP_ONLY, seed=0).decode(raw, 0)
    assert out["turns"] == [{"question": "Is the circle right or left of the square?", "answer": "right"}]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_reader_groups_keys_with_dots(tmp_path):
    from pe_lightning.data.shards import iter_tar_samples

    write_tar(tmp_path / "x.tar", [{"__key__": "a/0001", "png": b"1", "mask.png": b"2", "txt": b"t"}])
    (s,) = list(iter_tar_samples(str(tmp_path / "x.tar"), lambda r, d: None))
    assert s["__key__"] == "a/0001" and set(s) >= {"png", "mask.png", "txt"}
    with tarfile.open(tmp_path / "x.tar") as tf:
        assert len(tf.getnames()) == 3


def test_large_jpeg_decodes_in_draft_mode():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(buf, format="JPEG")
    raw = {"__key__": "k", "jpg": buf.getvalue(), "txt": b"noise"}
    dec = ImageTextDecoder(32, AugmentConfig(), None, seed=0)
    from pe_lightning.data.image_text import decode_image

    assert min(decode_image(raw, draft=dec.draft).size) >= 64  # downscaled by JPEG draft, not below 2 x 32
    assert decode_image(raw).size == (800, 600)
    assert dec.decode(raw, 0)["image"].shape == (3, 32, 32)


def test_multi_datamodule_steps_image_and_video_and_resumes(world):
    from pe_lightning.data import MultiDataModule

    def make():
        return MultiDataModule(
            image=ImageTextDataModule(cfg_for(world), tokenize=TOKENIZE, batch_size=8, keep_captions=True),
            video=VideoTextDataModule(cfg_for(world, num_frames=4), tokenize=TOKENIZE, batch_size=4,
                                      keep_captions=True))

    ref = make()
    it = iter(ref.train_dataloader())
    batches = [next(it) for _ in range(4)]
    assert batches[0]["image"]["image"].shape == (8, 3, 32, 32)
    assert batches[0]["video"]["video"].shape == (4, 4, 3, 32, 32)
    dm1 = make()
    it1 = iter(dm1.train_dataloader())
    next(it1), next(it1)
    dm2 = make()
    dm2.load_state_dict(dm1.state_dict())
    it2 = iter(dm2.train_dataloader())
    for b in batches[2:]:
        got = next(it2)
        assert got["image"]["caption"] == b["image"]["caption"]
        assert torch.equal(got["video"]["video"], b["video"]["video"])
