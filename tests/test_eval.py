"""Zero-shot classification and retrieval on fake models whose answers are known by construction."""

import pytest
import torch

from pe_lightning.eval import build_zeroshot_classifier, retrieval_eval, zeroshot_eval

COLOURS, SHAPES = ["red", "green", "blue"], ["circle", "square"]
CLASSNAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # 6 classes: index = 2 * colour + shape


class _LookupModel(torch.nn.Module):
    """encode_image: the image tensor itself (times a per-row scale, so normalisation matters);
    encode_text: a row of `text_table` picked by the token id (column 0 of the tokens)."""

    def __init__(self, text_table):
        super().__init__()
        self.text_table = text_table
        self.seen_training = []

    def encode_image(self, images):
        self.seen_training.append(self.training)
        return images * torch.arange(1, images.shape[0] + 1, dtype=images.dtype)[:, None]

    def encode_text(self, tokens):
        self.seen_training.append(self.training)
        return self.text_table[tokens[:, 0]] * 5.0


class _Tokenizer:
    def __init__(self, vocab):
        self.index = {t: i for i, t in enumerate(vocab)}
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return torch.tensor([[self.index[t], 0] for t in texts])


def test_build_zeroshot_classifier_mean_of_normalised_templates():
    templates = ["a {}.", "a photo of a {}.", lambda c: f"itap of a {c}."]
    classes = ["cat", "dog"]
    texts = [t(c) if callable(t) else t.format(c) for c in classes for t in templates]
    # text i -> a vector with a class part and a template-specific part of different lengths
    table = torch.tensor([
        [1.0, 0.0, 0.0], [2.0, 0.0, 2.0], [3.0, 0.0, 0.0],  # cat: templates 0, 1, 2
        [0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 4.0, 0.0],  # dog
    ])
    tok = _Tokenizer(texts)
    model = _LookupModel(table)
    clf = build_zeroshot_classifier(model, tok, classes, templates, device="cpu", batch_size=4)
    assert tok.calls == 2  # 6 texts in batches of 4
    r = 0.5 ** 0.5
    cat = torch.tensor([(1 + r + 1) / 3, 0.0, r / 3])
    dog = torch.tensor([0.0, (1 + r + 1) / 3, r / 3])
    expected = torch.stack([cat / cat.norm(), dog / dog.norm()])
    assert torch.allclose(clf, expected, atol=1e-6)
    assert model.training and model.seen_training == [False, False]  # eval during, restored after


def _zeroshot_setup():
    templates = ["a {}.", "a photo of a {}."]
    texts = [t.format(c) for c in CLASSNAMES for t in templates]
    # every template of class k embeds to the one-hot e_k: the classifier is the identity
    table = torch.eye(len(CLASSNAMES)).repeat_interleave(len(templates), dim=0)
    model, tok = _LookupModel(table), _Tokenizer(texts)
    clf = build_zeroshot_classifier(model, tok, CLASSNAMES, templates, device="cpu")
    assert torch.allclose(clf, torch.eye(6))
    return model, clf


def _scores(order):
    """An image embedding that ranks the classes in `order` (first = best)."""
    v = torch.zeros(6)
    for rank, k in enumerate(order):
        v[k] = 10.0 - rank
    return v


# (true label, class ranking). Classes: 0 red circle, 1 red square, 2 green circle, 3 green square,
# 4 blue circle, 5 blue square.
SAMPLES = [
    (0, [0, 1, 2, 3, 4, 5]),  # correct
    (1, [1, 0, 2, 3, 4, 5]),  # correct
    (2, [3, 2, 0, 1, 4, 5]),  # predicted green square: colour right, shape wrong; top5 hit
    (3, [5, 0, 1, 2, 4, 3]),  # predicted blue square: colour wrong, shape right; true class 6th -> top5 miss
    (4, [4, 0, 1, 2, 3, 5]),  # correct
    (5, [0, 5, 1, 2, 3, 4]),  # predicted red circle: both wrong; top5 hit
    (5, [5, 0, 1, 2, 3, 4]),  # correct
    (3, [2, 3, 0, 1, 4, 5]),  # predicted green circle: colour right, shape wrong
]


def _loader(batch_size=3):
    images = torch.stack([_scores(order) for _, order in SAMPLES])
    labels = torch.tensor([label for label, _ in SAMPLES])
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(SAMPLES), batch_size)]


def test_zeroshot_eval_known_answers():
    model, clf = _zeroshot_setup()
    out = zeroshot_eval(model, _loader(), clf, CLASSNAMES, heldout=["green square", "blue square"])
    assert out["top1"] == pytest.approx(4 / 8)
    assert out["top5"] == pytest.approx(7 / 8)
    # held out: samples with labels 3, 5, 5, 3 -> correct: only the 7th sample
    assert out["heldout_top1"] == pytest.approx(1 / 4)
    assert out["seen_top1"] == pytest.approx(3 / 4)  # labels 0, 1, 2, 4: 0, 1, 4 correct
    # colour right for samples 1, 2, 3, 5, 7, 8; shape right for 1, 2, 4, 5, 7
    assert out["factor0_acc"] == pytest.approx(6 / 8)
    assert out["factor1_acc"] == pytest.approx(5 / 8)
    # held-out subset: samples 4 (colour wrong, shape right), 6 (both wrong), 7 (both right), 8 (colour right)
    assert out["heldout_factor0_acc"] == pytest.approx(2 / 4)
    assert out["heldout_factor1_acc"] == pytest.approx(2 / 4)


def test_zeroshot_eval_factor_names_indices_dicts_and_preprocess():
    model, clf = _zeroshot_setup()
    loader = [{"image": img, "label": lab} for img, lab in _loader(batch_size=8)]
    out = zeroshot_eval(model, loader, clf, CLASSNAMES, heldout=[3, 5], factor_names=["colour", "shape"])
    assert out["colour_acc"] == pytest.approx(6 / 8) and out["shape_acc"] == pytest.approx(5 / 8)
    assert out["heldout_top1"] == pytest.approx(1 / 4) and out["heldout_colour_acc"] == pytest.approx(2 / 4)
    assert "factor0_acc" not in out
    # preprocess is applied: keep only the "blue circle" score -> everything predicted blue circle
    keep4 = torch.zeros(6)
    keep4[4] = 1.0
    out = zeroshot_eval(model, _loader(), clf, CLASSNAMES, preprocess=lambda x: x * keep4 + 1e-3)
    assert out["top1"] == pytest.approx(1 / 8)  # only the label-4 sample
    assert out["factor0_acc"] == pytest.approx(3 / 8)  # predicted blue: right for labels 4, 5, 5
    assert out["factor1_acc"] == pytest.approx(3 / 8)  # predicted circle: right for labels 0, 2, 4
    assert "heldout_top1" not in out
    with pytest.raises(ValueError, match="factor_names"):
        zeroshot_eval(model, _loader(), clf, CLASSNAMES, factor_names=["a", "b", "c"])


def test_zeroshot_eval_top5_capped_and_no_factors_for_single_words():
    names = ["cat", "dog", "bird"]
    model = _LookupModel(torch.eye(3))
    clf = torch.eye(3)
    images = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]])
    out = zeroshot_eval(model, [(images, torch.tensor([2, 0]))], clf, names, heldout=["bird"])
    assert out == {"top1": 0.5, "top5": 1.0, "heldout_top1": 0.0, "seen_top1": 1.0}
    with pytest.raises(ValueError, match="not one of the class names"):
        zeroshot_eval(model, [(images, torch.tensor([2, 0]))], clf, names, heldout=["fish"])


# ---------------------------------------------------------------- retrieval

def test_retrieval_one_caption_per_image_latin_square():
    # caption j's embedding has value L[j][i] in image i's direction; each row and column is a permutation
    # of (4, 3, 2, 1), so every caption has the same norm and no column has ties.
    L = [[4, 1, 2, 3], [3, 2, 4, 1], [2, 3, 1, 4], [1, 4, 3, 2]]
    caps = ["c0", "c1", "c2", "c3"]
    model, tok = _LookupModel(torch.tensor(L, dtype=torch.float32)), _Tokenizer(caps)
    images = torch.eye(4)  # image i = e_i (scaled differently per row by the fake model)
    loader = [(images[:2], caps[:2]), (images[2:], caps[2:])]
    out = retrieval_eval(model, loader, tok, "cpu", ks=(1, 2, 3))
    # t2i rank of caption j's owner: values 4, 2, 1, 2 in rows -> ranks 0, 2, 3, 2
    # i2t rank of image i's caption: column i values at row i: 4, 2, 1, 2 -> ranks 0, 2, 3, 2
    assert out == pytest.approx({"i2t_r1": 0.25, "i2t_r2": 0.25, "i2t_r3": 0.75,
                                 "t2i_r1": 0.25, "t2i_r2": 0.25, "t2i_r3": 0.75})
    assert list(out) == ["i2t_r1", "i2t_r2", "i2t_r3", "t2i_r1", "t2i_r2", "t2i_r3"]


def test_retrieval_several_captions_per_image_and_pessimistic_ties():
    import math

    def ang(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    caps = ["a", "b", "c", "d", "e"]
    table = torch.tensor([ang(80), ang(30), ang(10), ang(60), [1.0, 1.0]])
    model, tok = _LookupModel(table), _Tokenizer(caps)
    images = torch.eye(2)
    loader = [(images, [["a", "b"], ["c", "d", "e"]])]
    out = retrieval_eval(model, loader, tok, "cpu", ks=(1, 2))
    # i2t: image 0 best own = b (cos30), beaten by c (cos10): rank 1; image 1 best own = d (sin60),
    # beaten by a (sin80): rank 1. t2i: a -> rank 1, b -> 0, c -> 1, d -> 0, e -> tie -> counted as rank 1.
    assert out == pytest.approx({"i2t_r1": 0.0, "i2t_r2": 1.0, "t2i_r1": 0.4, "t2i_r2": 1.0})
    # pre-tokenised [B, K, ctx] captions give the same answer when K is constant
    tok2 = torch.tensor([[[0, 0], [1, 0]], [[2, 0], [3, 0]]])  # image 0: a, b; image 1: c, d
    out2 = retrieval_eval(model, [(images, tok2)], tok, "cpu", ks=(1, 2))
    assert out2 == pytest.approx({"i2t_r1": 0.0, "i2t_r2": 1.0, "t2i_r1": 0.5, "t2i_r2": 1.0})


def test_retrieval_collapsed_model_scores_zero_and_bad_batches():
    caps = ["x", "y", "z"]
    same = torch.tensor([[1.0, 0.0]]).repeat(3, 1)  # every embedding normalises to exactly (1, 0)
    model, tok = _LookupModel(same), _Tokenizer(caps)
    out = retrieval_eval(model, [(same, caps)], tok, ks=(1, 2))
    assert out == {"i2t_r1": 0.0, "i2t_r2": 0.0, "t2i_r1": 0.0, "t2i_r2": 0.0}
    with pytest.raises(ValueError, match="3 images but captions for 2"):
        retrieval_eval(model, [(torch.ones(3, 2), caps[:2])], tok)


def test_clip_benchmark_template_placeholders():
    from pe_lightning.eval.zeroshot import _fill

    assert _fill("a photo of a {c}.", "red circle") == "a photo of a red circle."
    assert _fill("a {}.", "red circle") == "a red circle."
    assert _fill(lambda c: f"itap of a {c}", "red circle") == "itap of a red circle"
