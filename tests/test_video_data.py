"""Video-text reading: Meta's frame-index rule, segment sampling, one augmentation per clip, bad clips
skipped and counted through the real stream."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from open_clip.tokenizer import tokenize as clip_tokenize

from pe_lightning.data import AugmentConfig, DataConfig, DataError, SourceConfig, VideoTextDataModule
from pe_lightning.data.shapes.motion import encode_mp4
from pe_lightning.data.testing import write_tar
from pe_lightning.data.video_text import (VideoTextDecoder, decode_video_frames, segment_bounds, segment_indices,
                                          uniform_indices, video_decoder_for)
from pe_lightning.data.transforms import sample_rng

TOKENIZE = functools.partial(clip_tokenize, context_length=16)
LEVELS16 = [8 + 15 * i for i in range(16)]  # frame f is flat grey 8 + 15 f: its mean names the frame


def grey_clip(levels, size=16) -> bytes:
    return encode_mp4([np.full((size, size, 3), v, np.uint8) for v in levels])


def frame_ids(frames, levels) -> list[int]:
    """Which source frame each decoded frame is (nearest grey level; levels are 15 apart, codec error < 4)."""
    out = []
    for f in frames:
        arr = np.asarray(f) if not torch.is_tensor(f) else ((f + 1) * 127.5).numpy()
        m = float(arr.mean())
        k = int(np.argmin([abs(m - v) for v in levels]))
        assert abs(m - levels[k]) < 5, f"frame mean {m:.1f} is not one of the levels"
        out.append(k)
    return out


# ---------------- Meta's uniform rule ----------------

def test_uniform_indices_are_metas_eval_rule():
    # int(i * (T - 1) / (N - 1)), hand-computed: 15/7 * i = 0, 2.14, 4.29, 6.43, 8.57, 10.71, 12.86, 15
    assert uniform_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 15]
    # a clip shorter than N repeats frames: 4/7 * i = 0, .57, 1.14, 1.71, 2.29, 2.86, 3.43, 4
    assert uniform_indices(5, 8) == [0, 0, 1, 1, 2, 2, 3, 4]
    assert uniform_indices(8, 8) == list(range(8))
    assert uniform_indices(1, 8) == [0] * 8
    # N = 1: the middle frame T // 2 (Meta's special case)
    assert uniform_indices(16, 1) == [8] and uniform_indices(5, 1) == [2] and uniform_indices(1, 1) == [0]
    with pytest.raises(ValueError, match="at least one frame"):
        uniform_indices(0, 8)


def test_decoded_frames_are_the_rule_s_frames():
    got = decode_video_frames(grey_clip(LEVELS16), 8)
    assert frame_ids(got, LEVELS16) == [0, 2, 4, 6, 8, 10, 12, 15]
    levels5 = LEVELS16[::3][:5]
    assert frame_ids(decode_video_frames(grey_clip(levels5), 8), levels5) == [0, 0, 1, 1, 2, 2, 3, 4]
    assert frame_ids(decode_video_frames(grey_clip(LEVELS16), 1), LEVELS16) == [8]


# ---------------- segment sampling ----------------

def test_segment_bounds_cover_the_clip_in_equal_parts():
    assert segment_bounds(16, 8) == [(2 * i, 2 * i + 2) for i in range(8)]
    assert segment_bounds(12, 8) == [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7), (7, 9), (9, 10), (10, 12)]
    # shorter than N: every segment keeps one frame, so frames repeat
    assert segment_bounds(5, 8) == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (3, 4), (3, 4), (4, 5)]


@pytest.mark.parametrize("t", [5, 12, 16, 37])
def test_segment_indices_stay_in_their_segments_and_vary(t):
    bounds = segment_bounds(t, 8)
    seen = [set() for _ in bounds]
    for index in range(300):
        idx = segment_indices(t, 8, sample_rng(7, index, 1))
        assert all(lo <= i < hi for i, (lo, hi) in zip(idx, bounds))
        assert idx == sorted(idx)
        for s, i in zip(seen, idx):
            s.add(i)
    # every frame of every segment gets drawn: uniform within the segment, not a fixed offset
    assert all(s == set(range(lo, hi)) for s, (lo, hi) in zip(seen, bounds))


def test_segment_mode_is_a_pure_function_of_seed_and_sample_index():
    raw = {"mp4": grey_clip(LEVELS16), "txt": b"a red circle moving to the left."}
    off = AugmentConfig(enabled=False)
    dec = VideoTextDecoder(16, 8, off, None, seed=3, frame_sampling="segment")
    picks = {i: frame_ids(dec.decode(raw, i)["video"], LEVELS16) for i in range(12)}
    again = VideoTextDecoder(16, 8, off, None, seed=3, frame_sampling="segment")
    assert all(frame_ids(again.decode(raw, i)["video"], LEVELS16) == picks[i] for i in (0, 5, 11))
    assert all(lo <= f < hi for p in picks.values() for f, (lo, hi) in zip(p, segment_bounds(16, 8)))
    assert len({tuple(p) for p in picks.values()}) > 6  # different samples, different frames
    other_seed = VideoTextDecoder(16, 8, off, None, seed=4, frame_sampling="segment")
    assert any(frame_ids(other_seed.decode(raw, i)["video"], LEVELS16) != picks[i] for i in range(12))
    # eval (train=False) and the uniform mode always take Meta's frames
    for d in (VideoTextDecoder(16, 8, off, None, seed=3, train=False, frame_sampling="segment"),
              VideoTextDecoder(16, 8, off, None, seed=3)):
        assert frame_ids(d.decode(raw, 5)["video"], LEVELS16) == uniform_indices(16, 8)


def static_clip() -> bytes:
    """12 identical frames of a left/right-asymmetric picture (red band on the left, a blue block)."""
    pic = np.zeros((32, 32, 3), np.uint8)
    pic[:, :10] = (230, 40, 40)
    pic[4:20, 14:30] = (40, 60, 220)
    return encode_mp4([pic] * 12)


def test_switching_the_sampling_mode_keeps_each_sample_s_augmentation():
    # the frame draw has its own generator: on a static clip the two modes differ only by codec noise
    raw = {"mp4": static_clip(), "txt": b"x"}
    seg = VideoTextDecoder(24, 8, AugmentConfig(), None, seed=0, frame_sampling="segment")
    uni = VideoTextDecoder(24, 8, AugmentConfig(), None, seed=0)
    for index in range(6):
        assert (seg.decode(raw, index)["video"] - uni.decode(raw, index)["video"]).abs().max() < 0.1
    assert (uni.decode(raw, 0)["video"] - uni.decode(raw, 1)["video"]).abs().max() > 0.3  # augmentations differ


def test_bad_frame_sampling_is_a_clear_error():
    with pytest.raises(DataError, match=r"data.frame_sampling must be one of uniform, segment, got 'rand'"):
        VideoTextDecoder(16, 8, AugmentConfig(), None, seed=0, frame_sampling="rand")
    with pytest.raises(DataError, match="data.frame_sampling"):
        video_decoder_for(DataConfig(frame_sampling="middle"), None, 0)
    assert video_decoder_for(DataConfig(frame_sampling="segment"), None, 0).frame_sampling == "segment"
    assert DataConfig().frame_sampling == "uniform"


# ---------------- one augmentation per clip ----------------

def test_one_crop_flip_and_jitter_for_all_frames_of_a_clip():
    # a static clip with a left/right-asymmetric picture: per-frame augmentation would make its frames differ
    raw = {"mp4": static_clip(), "txt": b"a red square moving to the left."}
    dec = VideoTextDecoder(24, 8, AugmentConfig(), TOKENIZE, seed=0, keep_captions=True)
    ref = VideoTextDecoder(24, 8, AugmentConfig(), None, seed=0, train=False).decode(raw, 0)["video"][0]
    flips = 0
    for index in range(10):
        out = dec.decode(raw, index)
        v = out["video"]
        assert (v - v[0:1]).abs().max() < 0.1, "frames of one clip got different augmentations"
        flipped = dec.transform.sample(sample_rng(0, index), 32, 32).flip
        flips += flipped
        assert ("right" in out["caption"]) == flipped  # a flipped clip's caption is made truthful
        # the red band is on the left unless flipped
        red = v[0, 0] - v[0, 2]
        assert (red[:, : 12].mean() > red[:, -12:].mean()) != flipped
    assert 0 < flips < 10
    assert not torch.allclose(dec.decode(raw, 0)["video"][0], ref)  # and it is augmented at all


# ---------------- bad clips through the real stream ----------------

def _video_shard(path, start, n=8):
    """n clips; clip start+2 has garbage bytes, start+4 an empty mp4, start+6 a truncated mp4 (no index)."""
    samples = []
    for i in range(start, start + n):
        levels = [(20 + 25 * ((i + f) % 9)) for f in range(6)]
        mp4 = grey_clip(levels)
        if i - start == 2:
            mp4 = b"\x00\x00\x00\x18ftypmp42 this is not a video"
        elif i - start == 4:
            mp4 = b""
        elif i - start == 6:
            mp4 = mp4[: len(mp4) // 3]
        samples.append({"__key__": f"{i:05d}", "mp4": mp4, "txt": f"clip {i}".encode(), "json": b"{}"})
    write_tar(path, samples)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_clips_in_a_shard_are_skipped_and_counted(tmp_path, workers):
    _video_shard(tmp_path / "00000.tar", 0)
    _video_shard(tmp_path / "00001.tar", 100)
    # size = the 10 usable clips, so that one epoch is exactly one pass over both shards (one per stream)
    cfg = DataConfig(video=[SourceConfig(urls=str(tmp_path / "{00000..00001}.tar"), size=10)], workers=workers,
                     streams=2, chunk_size=1, image_size=16, num_frames=4, video_shuffle_buffer=0, resampled=False)
    dm = VideoTextDataModule(cfg, tokenize=TOKENIZE, batch_size=2, keep_captions=True)
    caps = []
    for b in dm.train_dataloader():  # one pass over both shards
        assert b["video"].shape == (2, 4, 3, 16, 16)
        caps += b["caption"]
    assert dm.skipped() == {"bad_video": 6}
    bad = {f"clip {s + k}" for s in (0, 100) for k in (2, 4, 6)}
    good = {f"clip {s + k}" for s in (0, 100) for k in range(8)} - bad
    assert set(caps) == good and len(caps) == len(good)
