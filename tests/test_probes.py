"""Per-layer probes: kNN / linear / dense probes against known accuracies and hand-computed mIoU, the layer-wise
plot, and `probe_export` / `pe-lightning probe` end to end on a tiny random model and a tiny shapes world."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from pe_lightning.eval import plots
from pe_lightning.eval.probe_run import ProbeError, dense_classes, main, parse_layers, probe_export
from pe_lightning.eval.probes import (HEAD, check_layers, class_iou, dense_probe, dense_probe_fit,
                                      extract_layer_features, knn_probe, linear_probe, linear_probe_fit, miou,
                                      soft_token_targets)
from pe_lightning.models import build_model, export_checkpoint


# ----------------------------------------------------------------------------------------------------------
# synthetic global features

def clusters(n_cls: int, per_class: int, dim: int = 16, spread: float = 0.3, seed: int = 0):
    """Gaussian clusters around orthogonal directions (mean 3 * e_c), sorted by class: (x [N, dim], y [N])."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n_cls).repeat_interleave(per_class)
    x = 3.0 * torch.eye(dim)[y] + spread * torch.randn(len(y), dim, generator=gen)
    return x, y


def flip_first(y: torch.Tensor, per_class: int, n_flip: int, n_cls: int) -> torch.Tensor:
    """Relabel the first n_flip samples of each class (sorted by class) as the next class."""
    y = y.clone()
    for c in range(n_cls):
        y[c * per_class:c * per_class + n_flip] = (c + 1) % n_cls
    return y


@pytest.mark.parametrize("probe", [knn_probe, linear_probe])
def test_global_probes_reach_known_accuracy_on_separable_features(probe):
    train_x, train_y = clusters(6, 30, seed=0)
    test_x, test_y = clusters(6, 20, seed=1)
    assert probe(train_x, train_y, test_x, test_y) == 1.0
    # 5 of every 20 test labels wrong: a perfect classifier scores exactly 15 / 20
    assert probe(train_x, train_y, test_x, flip_first(test_y, 20, 5, 6)) == pytest.approx(0.75)


@pytest.mark.parametrize("probe", [knn_probe, linear_probe])
def test_global_probes_are_at_chance_on_shuffled_labels(probe):
    train_x, train_y = clusters(10, 40, seed=0)
    test_x, test_y = clusters(10, 100, seed=1)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(3))]
    acc = probe(train_x, shuffled, test_x, test_y)
    assert abs(acc - 0.1) < 0.05, acc


def test_knn_weighted_vote_differs_from_majority_as_computed_by_hand():
    # query e0; one train sample of class 0 at cosine 1.0, two of class 1 at cosine 0.6
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_y = torch.tensor([0, 1, 1])
    test_x, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # weighted: exp(1 / 0.07) = e^14.3 > 2 exp(0.6 / 0.07) = 2 e^8.6 -> class 0; majority: 2 votes to 1 -> class 1
    assert knn_probe(train_x, train_y, test_x, test_y, k=3) == 1.0
    assert knn_probe(train_x, train_y, test_x, test_y, k=3, temperature=None) == 0.0
    # k larger than the train set is capped
    assert knn_probe(train_x, train_y, test_x, test_y, k=50) == 1.0


def test_linear_probe_chooses_weight_decay_on_train_only():
    train_x, train_y = clusters(4, 25, spread=2.0, seed=0)
    test_x, test_y = clusters(4, 25, spread=2.0, seed=1)
    first = linear_probe_fit(train_x, train_y, test_x, test_y, seed=0)
    other_test = linear_probe_fit(train_x, train_y, -test_x, test_y.flip(0), seed=0)
    assert first.val_top1 == other_test.val_top1 and first.weight_decay == other_test.weight_decay
    assert first.val_top1 and first.weight_decay in first.val_top1
    # deterministic for a seed
    assert linear_probe_fit(train_x, train_y, test_x, test_y, seed=0) == first


# ----------------------------------------------------------------------------------------------------------
# mIoU and the dense probe

def test_miou_equals_hand_computed_value():
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 2, 3, 0]])
    # class 0: inter 1, union 2 -> 1/2 (the ignored pixel's prediction is not counted)
    # class 1: inter 2, union 3 -> 2/3;  class 2: inter 2, union 3 -> 2/3
    # class 3: predicted once, never in the target -> IoU 0, counted (union 1)
    # class 4: in neither -> excluded
    iou = class_iou(pred, target, num_classes=5, ignore_index=255)
    assert iou[:4].tolist() == pytest.approx([0.5, 2 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[4])
    assert miou(pred, target, 5, ignore_index=255) == pytest.approx((0.5 + 2 / 3 + 2 / 3 + 0.0) / 4)
    assert miou(target.clamp(max=2), target.clamp(max=2), 3) == 1.0


def test_soft_token_targets_are_class_fractions_per_token():
    masks = torch.tensor([[[0, 0, 1, 1],
                           [0, 1, 1, 1],
                           [2, 2, 0, 0],
                           [2, 255, 0, 0]]])
    soft = soft_token_targets(masks, 3, (2, 2), ignore_index=255)
    assert soft.shape == (1, 3, 2, 2)
    assert soft[0, :, 0, 0].tolist() == [0.75, 0.25, 0.0]
    assert soft[0, :, 0, 1].tolist() == [0.0, 1.0, 0.0]
    assert soft[0, :, 1, 0].tolist() == [0.0, 0.0, 0.75]  # the ignored pixel counts for no class
    assert soft[0, :, 1, 1].tolist() == [1.0, 0.0, 0.0]


def one_class_images(classes: list[int], n_cls: int = 3, dim: int = 8, grid: int = 4, px: int = 16, seed: int = 0):
    """Images each wholly of one class: token features = 4 * one-hot(class) + noise, masks = the class."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.tensor(classes)
    maps = 4.0 * torch.eye(dim)[c].view(-1, dim, 1, 1).expand(-1, dim, grid, grid)
    maps = maps + 0.1 * torch.randn(maps.shape, generator=gen)
    masks = c.view(-1, 1, 1).expand(-1, px, px).clone()
    return maps, masks


def test_dense_probe_on_a_separable_toy_matches_the_hand_computed_miou():
    train_maps, train_masks = one_class_images([0, 1, 2] * 4, seed=0)
    test_maps, test_masks = one_class_images([0, 1, 2] * 3, seed=1)
    assert dense_probe(train_maps, train_masks, test_maps, test_masks, 3) == 1.0
    # one class-0 test image relabelled 1: class 0 inter 2 / union 3, class 1 inter 3 / union 4, class 2: 1
    wrong = test_masks.clone()
    wrong[0] = 1
    result = dense_probe_fit(train_maps, train_masks, test_maps, wrong, 3)
    assert result.class_iou == pytest.approx([2 / 3, 3 / 4, 1.0])
    assert result.miou == pytest.approx((2 / 3 + 3 / 4 + 1.0) / 3)
    assert result.final_loss < 0.05


def test_dense_probe_upsamples_logits_to_token_aligned_boundaries():
    # left half of every image is class 1, right half class 0; the token features say which half
    grid, px = 4, 16
    side = torch.tensor([1.0, 1.0, -1.0, -1.0]).view(1, 1, 1, grid).expand(1, 1, grid, grid)
    maps = torch.cat([side, torch.zeros(1, 3, grid, grid)], dim=1).repeat(6, 1, 1, 1)
    masks = torch.zeros(6, px, px, dtype=torch.long)
    masks[:, :, :px // 2] = 1
    assert dense_probe(maps[:4], masks[:4], maps[4:], masks[4:], 2) == 1.0


def test_dense_classes_map_colour_shapes_to_shapes():
    from pe_lightning.data.shapes.scenes import CLASSES, SHAPES

    names, lut = dense_classes(CLASSES)
    assert names == ["background", *SHAPES]
    assert lut[0] == 0  # background
    assert lut[1 + CLASSES.index("red triangle")] == 1 + SHAPES.index("triangle")
    assert lut[1 + CLASSES.index("black cross")] == 1 + SHAPES.index("cross")
    other_names, other = dense_classes(["cat", "dog"])
    assert other_names == ["background", "cat", "dog"] and other.tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# features

def test_layer_features_match_truncated_towers_and_the_head():
    torch.manual_seed(0)
    model = build_model("tiny", text=None).eval()
    images = torch.randn(5, 3, 32, 32)
    loader = [(images[:3], torch.tensor([0, 1, 2])), (images[3:], torch.tensor([3, 4]))]
    feats = extract_layer_features(model.visual, loader, [1, 3, 4], "cpu")
    assert feats.layers == [1, 3, 4] and feats.labels.tolist() == [0, 1, 2, 3, 4] and feats.grid == (4, 4)
    with torch.no_grad():
        for k in (1, 3, 4):
            tower = copy.deepcopy(model.visual).truncate(k)  # no ln_post: the raw output after k blocks
            tokens = tower.forward_features(images)[:, tower.num_prefix_tokens:]
            torch.testing.assert_close(feats.pooled[k], tokens.mean(dim=1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(feats.maps[k].flatten(2).transpose(1, 2), tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(feats.pooled[HEAD], model.encode_image(images), atol=1e-5, rtol=1e-5)
    no_head = extract_layer_features(model.visual, loader, [2], "cpu", keep_maps=False)
    assert set(no_head.pooled) == {2} and no_head.maps == {}


def test_layers_are_checked_with_a_clear_message():
    assert check_layers(None, 4) == [1, 2, 3, 4]
    assert check_layers([3, 1, 3], 4) == [1, 3]
    with pytest.raises(ValueError, match=r"not in 1\.\.4"):
        check_layers([0, 5], 4)
    assert parse_layers("1,2,4") == [1, 2, 4] and parse_layers("2-4") == [2, 3, 4] and parse_layers("all") is None
    with pytest.raises(ProbeError, match="layers='x'"):
        parse_layers("x")


# ----------------------------------------------------------------------------------------------------------
# plots

def fake_result(label: str = "r/pretrain", depth: int = 4) -> dict:
    scores = {"knn": [0.2, 0.5, 0.4, 0.3], "linear": [0.3, 0.6, 0.6, 0.5], "dense": [0.4, 0.35, 0.3, 0.2]}
    out = {task: [{"layer": k + 1, "score": s} for k, s in enumerate(v[:depth])] for task, v in scores.items()}
    out.update(head={"knn": 0.45, "linear": 0.55}, label=label, depth=depth)
    return out


def test_layer_curves_have_one_normalised_curve_per_task(tmp_path):
    fig = plots.layer_curves_figure(fake_result())
    (ax,) = fig.axes
    assert len(ax.lines) == 3
    curves = {line.get_label().split(" (")[0]: line for line in ax.lines}
    assert set(curves) == {plots.TASK_LABELS[t] for t in plots.TASKS}
    knn = curves[plots.TASK_LABELS["knn"]]
    assert list(knn.get_xdata()) == [1, 2, 3, 4]
    assert list(knn.get_ydata()) == pytest.approx([0.4, 1.0, 0.8, 0.6])  # relative to layer 2's 0.5
    assert "best layer 1" in curves[plots.TASK_LABELS["dense"]].get_label()
    path = plots.save_png(fig, tmp_path / "probe.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.figure_rgb(fig).ndim == 3


def test_compare_figure_has_one_panel_per_task_and_one_curve_per_export():
    fig = plots.compare_figure([fake_result("a"), fake_result("b", depth=3)])
    assert len(fig.axes) == 3
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 2]
    assert [line.get_label() for line in fig.axes[0].lines] == ["a", "b"]
    with pytest.raises(ValueError, match="at least one"):
        plots.compare_figure([])


# ----------------------------------------------------------------------------------------------------------
# end to end on a tiny world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pe_lightning.data.shapes.writer import generate_shapes_world

    root = tmp_path_factory.mktemp("probe") / "world"
    generate_shapes_world(root, train=64, size=32, zeroshot_per_class=2, probe_per_class=2, retrieval=16,
                          video_train=8, video_test=8, instruct=8, instruct_test=8, workers=1)
    return root


def test_probe_export_writes_one_entry_per_layer_per_task(world, tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny")
    out = tmp_path / "probe"
    result = probe_export(model, world, out, image_size=32, tb_dir=tmp_path / "tb", device="cpu", label="t/x")
    saved = json.loads((out / "probe.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for task in ("knn", "linear", "dense"):
        assert [e["layer"] for e in saved[task]] == [1, 2, 3, 4]
        assert all(0.0 <= e["score"] <= 1.0 for e in saved[task])
    assert set(saved["head"]) >= {"knn", "linear"}
    assert saved["data"]["train"] == 96 and saved["data"]["test"] == 96 and saved["data"]["classes"] == 48
    assert saved["data"]["dense_classes"] == ["background", "circle", "square", "triangle", "star", "hexagon",
                                              "cross"]
    assert len(saved["dense"][0]["class_iou"]) == 7
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert model.visual.training  # the tower's mode is restored


def test_probe_command_on_a_stage_export_and_a_weights_file(world, tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny")
    export = tmp_path / "runs" / "r" / "pretrain" / "export"
    export.mkdir(parents=True)
    export_checkpoint(model, export / "model.pt")
    (export / "config.yaml").write_text("model:\n  preset: tiny\n  vision: {}\n  text: {}\n")
    common = [f"runs_dir={tmp_path / 'runs'}", f"data_root={world}", "image_size=32", "device=cpu", "tb=false"]
    assert main(["run=r", "layers=2,4", *common]) == 0  # the run's only export is found
    stage_probe = json.loads((tmp_path / "runs" / "r" / "pretrain" / "probe" / "probe.json").read_text())
    assert [e["layer"] for e in stage_probe["linear"]] == [2, 4] and stage_probe["label"] == "r/pretrain"

    weights = tmp_path / "my-weights.pt"
    export_checkpoint(model, weights)
    assert main(["run=r", f"weights={weights}", "model=tiny", "layers=1", *common]) == 0
    file_probe = json.loads((tmp_path / "runs" / "r" / "probe-my-weights" / "probe.json").read_text())
    assert [e["layer"] for e in file_probe["knn"]] == [1] and file_probe["head"] is None
    # the same weights probe the same: layer 2 and 4 of one run equal those of the other file's run
    assert main(["run=r", f"weights={weights}", "model=tiny", "layers=2,4", *common]) == 0
    again = json.loads((tmp_path / "runs" / "r" / "probe-my-weights" / "probe.json").read_text())
    assert [e["score"] for e in again["linear"]] == [e["score"] for e in stage_probe["linear"]]

    out_png = tmp_path / "compare.png"
    assert main(["compare", str(out_png), str(tmp_path / "runs" / "r" / "pretrain"),
                 str(tmp_path / "runs" / "r" / "probe-my-weights" / "probe.json")]) == 0
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_probe_command_errors_name_the_fix(world, tmp_path):
    runs = f"runs_dir={tmp_path / 'runs'}"
    with pytest.raises(ProbeError, match="no finished stage export"):
        main(["run=nothing", runs])
    with pytest.raises(ProbeError, match="run the stage first"):
        main(["run=nothing", "stage=video", runs])
    with pytest.raises(ProbeError, match="valid keys"):
        main(["run=r", "layer=3"])
    with pytest.raises(ProbeError, match="not both"):
        main(["stage=pretrain", "weights=x.pt"])
    with pytest.raises(ProbeError, match="name the model"):
        weights = tmp_path / "unknown.pt"
        export_checkpoint(build_model("tiny"), weights)
        main([f"weights={weights}", runs])
    with pytest.raises(ProbeError, match=r"not in 1\.\.4"):
        main([f"weights={weights}", "model=tiny", "layers=9", runs, f"data_root={world}"])
    with pytest.raises(ProbeError, match="no probe.json"):
        main(["compare", str(tmp_path / "c.png"), str(tmp_path)])


def test_probe_export_on_a_user_set_without_masks_skips_the_dense_probe(tmp_path):
    from pe_lightning.data.testing import png_bytes, write_tar

    colours = [(220, 30, 30), (30, 30, 220)]
    root = tmp_path / "colours"
    for split, n in (("train", 6), ("test", 4)):
        samples = [{"__key__": f"{split}{i:03d}", "png": png_bytes(colours[i % 2], 16), "cls": str(i % 2).encode()}
                   for i in range(n)]
        write_tar(root / split / "0.tar", samples)
        (root / split / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("red\nblue\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    torch.manual_seed(0)
    result = probe_export(build_model("tiny"), root, tmp_path / "out", layers=[1, 4], image_size=32, device="cpu")
    assert result["dense"] == [] and "no .mask.png" in result["data"]["dense_skipped"]
    # flat colours: every image of a class has the same features, so kNN and the linear probe are exact
    assert [e["score"] for e in result["knn"]] == [1.0, 1.0]
    assert [e["score"] for e in result["linear"]] == [1.0, 1.0]
    assert result["data"]["classes"] == 2 and (tmp_path / "out" / "probe.png").is_file()
