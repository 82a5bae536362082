"""Video evaluation: the eval set's labels, retrieval against independent references, zero-shot on models
whose answers are known by construction, the tiny model end to end, bad clips counted."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
import torch.nn.functional as F

from pe_lightning.data.shapes.motion import MOTIONS
from pe_lightning.data.shapes.scenes import CLASSES
from pe_lightning.data.testing import write_tar
from pe_lightning.eval.retrieval import recall_at_k
from pe_lightning.eval.video import (AXES, MOTION_AXIS, _motion_metrics, class_prompts, load_video_eval_set,
                                     multi_positive_recall, same_caption, video_eval)
from pe_lightning.models import build_model, get_tokenizer

TOKENIZE = get_tokenizer(32)
RATES = ["video_t2v_r1", "video_t2v_r5", "video_t2v_r10", "video_v2t_r1", "video_v2t_r5", "video_v2t_r10",
         "video_zeroshot_top1", "video_motion_top1", "video_axis_top1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pe_lightning.data.shapes.writer import generate_shapes_world

    root = tmp_path_factory.mktemp("vworld") / "w"
    generate_shapes_world(root, train=64, size=32, zeroshot_per_class=1, probe_per_class=1, retrieval=16,
                          video_train=8, video_test=16, instruct=8, instruct_test=8, workers=1)
    return root


def raw_clips(folder) -> list[dict]:
    """Independent reader of the test shards: {key: {"txt", "json"}} in shard order."""
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            items: dict = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                items.setdefault(key, {})[ext] = tf.extractfile(m).read()
        out += [items[k] for k in sorted(items)]
    return out


class BagOfWords(torch.nn.Module):
    """encode_text: a fixed random embedding per token id, summed over the caption's tokens; encode_video: the
    text embedding of the clip's own caption, looked up by the frames' bytes (`table`), optionally shifted by
    one clip (`shift`) so that every video points at its neighbour's caption."""

    def __init__(self, table: dict, shift: int = 0, dim: int = 256):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.randn(49408, dim, generator=g)
        self.keys = list(table)
        self.table, self.shift = table, shift

    def encode_text(self, tokens):
        w = (tokens > 0) & (tokens < 49406)  # words only: no SOT / EOT / padding
        return (self.emb[tokens] * w[..., None]).sum(1)

    def encode_video(self, frames, normalize=False):
        assert not normalize  # the eval pools un-normalised frame embeddings itself
        caps = []
        for f in frames:
            k = self.keys.index(_key(f))
            caps.append(self.table[self.keys[(k + self.shift) % len(self.keys)]])
        return self.encode_text(TOKENIZE(caps)) * 3.0  # a scale: the eval must normalise


def _key(frames: torch.Tensor) -> bytes:
    return frames.contiguous().numpy().tobytes()


@pytest.fixture(scope="module")
def loaded(world):
    loader = load_video_eval_set(world / "video" / "test", image_size=32, num_frames=8, batch_size=5)
    batches = list(loader)
    table = {_key(v): c for b in batches for v, c in zip(b["video"], b["caption"])}
    return loader, batches, table


# ---------------- the eval set ----------------

def test_eval_set_batches_and_labels_match_the_shards(world, loaded):
    _, batches, _ = loaded
    b = batches[0]
    assert b["video"].shape == (5, 8, 3, 32, 32) and b["video"].min() >= -1 and b["video"].max() <= 1
    assert not torch.equal(b["video"][:, 0], b["video"][:, -1])  # first and last frame differ: things move
    raws = raw_clips(world / "video" / "test")
    assert sum(len(x["caption"]) for x in batches) == len(raws) == 16
    caps = [c for x in batches for c in x["caption"]]
    motion = torch.cat([x["motion"] for x in batches])
    colour_shape = torch.cat([x["colour_shape"] for x in batches])
    axis = torch.cat([x["axis"] for x in batches])
    tracks = torch.cat([x["tracks"] for x in batches])
    for i, r in enumerate(raws):
        meta = json.loads(r["json"])
        first = meta["tracks"][0]
        assert caps[i] == r["txt"].decode().strip()
        assert MOTIONS[motion[i]] == first["motion"]
        assert CLASSES[colour_shape[i]] == f"{first['colour']} {first['shape']}"
        assert AXES[axis[i]] == MOTION_AXIS[first["motion"]] and tracks[i] == len(meta["tracks"])
    assert (tracks == 1).sum() >= 4  # enough single-track clips for the zero-shot tasks


def test_class_prompts_are_in_the_caption_style():
    p = class_prompts()
    assert len(p["colour_shape"]) == 48 and len(p["motion"]) == 8 and len(p["axis"]) == 5
    assert "a red circle moving to the left." in p["colour_shape"][CLASSES.index("red circle")]
    assert "an orange star moving up." in p["motion"][MOTIONS.index("up")]
    assert all("turning" in t for t in p["motion"][MOTIONS.index("recolour")])
    horizontal = set(p["axis"][AXES.index("horizontal")])
    assert horizontal == set(p["motion"][MOTIONS.index("left")]) | set(p["motion"][MOTIONS.index("right")])
    assert not any("blue circle" in t for group in p["motion"] for t in group)  # a held-out pair


# ---------------- retrieval ----------------

def test_multi_positive_recall_equals_recall_at_k_on_unique_captions():
    g = torch.Generator().manual_seed(1)
    v = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    t = F.normalize(v + 0.8 * torch.randn(30, 8, generator=g), dim=-1)
    ours = multi_positive_recall(v, t, torch.eye(30, dtype=torch.bool))
    ref = recall_at_k(v, t, torch.arange(30))
    for k in (1, 5, 10):
        assert ours[f"v2t_r{k}"] == pytest.approx(ref[f"i2t_r{k}"])
        assert ours[f"t2v_r{k}"] == pytest.approx(ref[f"t2i_r{k}"])
    assert 0.1 < ours["v2t_r1"] < 1.0  # a non-trivial case


def test_duplicate_captions_are_positives_of_each_other():
    # clips 0 and 1 have the same caption "A"; clip 2 has "B". Similarities, hand-chosen:
    sim = torch.tensor([[0.2, 0.9, 0.5],   # video 0: best is caption 1 (= "A", a positive) -> hit
                        [0.1, 0.3, 0.4],   # video 1: caption 2 ("B") beats both "A"s -> miss at 1, hit at 5
                        [0.0, 0.6, 0.7]])  # video 2: its caption scores best -> hit
    pos = same_caption(["A", "A", "B"])
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # embeddings whose dot products are exactly `sim`: video rows = sim, text = identity
    out = multi_positive_recall(sim, torch.eye(3), pos, ks=(1, 5))
    assert out["v2t_r1"] == pytest.approx(2 / 3) and out["v2t_r5"] == 1.0
    # texts: caption 0 -> videos (0: .2, 1: .1, 2: 0) best positive .2 > 0: hit; caption 1 -> (.9, .3, .6): hit;
    # caption 2 -> (.5, .4, .7): hit
    assert out["t2v_r1"] == 1.0


def test_identical_video_and_text_embeddings_give_perfect_retrieval(loaded):
    loader, _, table = loaded
    out = video_eval(BagOfWords(table), loader, TOKENIZE)
    assert out["video_t2v_r1"] == 1.0 and out["video_v2t_r1"] == 1.0
    # the same model pointing every video at its neighbour's caption: retrieval collapses
    wrong = video_eval(BagOfWords(table, shift=1), loader, TOKENIZE)
    assert wrong["video_v2t_r1"] <= 0.2 and wrong["video_t2v_r1"] <= 0.2


def test_zero_shot_of_a_caption_reading_model_is_right(loaded):
    # a "video" embedding that is its caption's text embedding knows colour, shape and motion (a caption says
    # "moving to the left"), so all three tasks are answered from the words alone: every label must line up
    loader, _, table = loaded
    out = video_eval(BagOfWords(table), loader, TOKENIZE)
    assert out["video_zeroshot_top1"] == 1.0
    assert out["video_motion_top1"] == 1.0 and out["video_axis_top1"] == 1.0
    assert out["video_clips"] == 16 and out["video_skipped_clips"] == 0 and 4 <= out["video_zeroshot_clips"] <= 16


def test_motion_metrics_per_class_and_swaps_by_hand():
    L, R, U, D, G = (MOTIONS.index(m) for m in ("left", "right", "up", "down", "grow"))
    true = torch.tensor([L, R, U, D, G, L])
    pred = torch.tensor([R, R, D, U, G, L])
    out = _motion_metrics(pred, true)
    assert out["video_motion_top1"] == pytest.approx(3 / 6)
    assert out["video_motion_left_acc"] == pytest.approx(1 / 2) and out["video_motion_right_acc"] == 1.0
    assert out["video_motion_up_acc"] == 0.0 and out["video_motion_grow_acc"] == 1.0
    assert out["video_motion_swap_lr"] == pytest.approx(1 / 3)  # 1 of 3 left/right clips got the opposite
    assert out["video_motion_swap_ud"] == 1.0 and out["video_motion_swap_gs"] == 0.0
    assert "video_motion_still_acc" not in out  # absent classes get no key


# ---------------- the tiny model end to end ----------------

def test_tiny_model_video_eval_keys_and_ranges(world):
    torch.manual_seed(0)
    model = build_model("tiny")
    loader = load_video_eval_set(world / "video" / "test", image_size=32, num_frames=8, batch_size=8)
    out = video_eval(model, loader, TOKENIZE, device="cpu")
    for k in RATES + ["video_motion_swap_lr", "video_motion_swap_ud", "video_motion_swap_gs"]:
        if k.startswith("video_motion_swap") and k not in out:
            continue  # a pair absent from this small set
        assert 0.0 <= out[k] <= 1.0, k
    assert set(RATES) <= set(out)
    assert out["video_t2v_r10"] >= out["video_t2v_r5"] >= out["video_t2v_r1"]
    assert out["video_clips"] == 16
    assert model.training  # the model's mode is restored


def test_encode_video_pools_un_normalised_frames_then_normalises(world, loaded):
    # the eval's video embedding is F.normalize(mean of un-normalised frame embeddings): check against a direct
    # computation with encode_image on a tiny model with a frame-dependent scale
    from pe_lightning.eval.video import encode_clips

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    loader, batches, _ = loaded
    emb = encode_clips(model, batches[:1], TOKENIZE, preprocess=lambda x: F.interpolate(x, size=64))
    frames = F.interpolate(batches[0]["video"].flatten(0, 1), size=64)
    with torch.no_grad():
        per_frame = model.encode_image(frames).view(5, 8, -1)
    assert torch.allclose(emb.video, F.normalize(per_frame.mean(1), dim=-1), atol=1e-5)
    assert not torch.allclose(emb.video, F.normalize(F.normalize(per_frame, dim=-1).mean(1), dim=-1), atol=1e-4)


# ---------------- bad clips ----------------

def test_corrupt_clips_in_the_eval_set_are_skipped_and_counted(world, tmp_path):
    raws = raw_clips(world / "video" / "test")[:4]
    samples = [{"__key__": f"{i:04d}", **r} for i, r in enumerate(raws)]
    samples[1]["mp4"] = b"not a video at all"
    samples[3]["mp4"] = b""
    write_tar(tmp_path / "test" / "00000.tar", samples)
    loader = load_video_eval_set(tmp_path, image_size=32, num_frames=8, batch_size=4)
    model = BagOfWords({})
    table = {_key(v): c for b in loader for v, c in zip(b["video"], b["caption"])}
    model.keys, model.table = list(table), table
    out = video_eval(model, loader, TOKENIZE)
    assert out["video_clips"] == 2 and out["video_skipped_clips"] == 2
    # the loader's counter is cumulative (two passes here: the table, then the eval); the eval reports its own
    assert dict(loader.dataset.skipped) == {"bad_video": 4}
    assert out["video_v2t_r1"] == 1.0
