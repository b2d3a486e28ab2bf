"""Area-ratio weak labels (lesionflow.weak): graph construction on hand-made label maps, the count
rule with and without an estimate error, the ignore region in every loss, the size penalty and the
gcn+head ranking, the weaken helper, and the pseudo_label step turning weak records into
pseudo-labels that meta-training can read."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from lesionflow import cli, config, tracking
from lesionflow.data.manifest import IGNORE_VALUE, read_manifest
from lesionflow.data.transforms import load_mask, load_target
from lesionflow.data.weaken import weaken
from lesionflow.errors import ConfigError, WeakLabelError
from lesionflow.losses import IGNORE, dice_bce_loss, size_loss
from lesionflow.metrics import dice
from lesionflow.steps.ingest import build_dataset
from lesionflow.steps.pseudo_label import pseudo_label
from lesionflow.training import SegmentationDataset, labelled, validation_dice
from lesionflow.weak import (
    BACKGROUND,
    FOREGROUND,
    IGNORED,
    build_graph,
    count_bounds,
    normalized_adjacency,
    region_adjacency,
    superpixels,
    vertex_labels,
)
from lesionflow.weak.step import to_png
from lesionflow.weak.train import boundary_contrast, vertex_loss, vertex_scores

# four 2x2 quadrants: 0 | 1 over 2 | 3 — 4-neighbours share a side, 0-3 and 1-2 only a corner
QUADRANTS = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
QUADRANT_FEATURES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 2.0]])  # per label


def features_of(labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[labels].permute(2, 0, 1).contiguous()  # (C, H, W)


def test_region_adjacency_4_and_8_neighbourhood():
    assert region_adjacency(QUADRANTS, 4).T.tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]
    assert region_adjacency(QUADRANTS, 8).T.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    with pytest.raises(WeakLabelError, match="connectivity"):
        region_adjacency(QUADRANTS, 6)


def test_graph_vertices_means_and_gaussian_weights():
    graph = build_graph(features_of(QUADRANTS, QUADRANT_FEATURES), QUADRANTS, sigma=2.0)
    assert graph.n == 4 and graph.area.tolist() == [4, 4, 4, 4]
    assert torch.allclose(graph.x, QUADRANT_FEATURES)
    # distances 0-1: 1, 0-2: 2, 1-3: 2, 2-3: 1 → exp(-d²/σ²) with σ = 2
    expected = torch.tensor([math.exp(-1 / 4), math.exp(-4 / 4), math.exp(-4 / 4), math.exp(-1 / 4)])
    assert torch.allclose(graph.edge_weight, expected)
    # default σ: the median edge distance, so the weights straddle exp(-1) whatever the feature scale
    scaled = build_graph(features_of(QUADRANTS, 10 * QUADRANT_FEATURES), QUADRANTS)
    assert scaled.edge_weight.max() <= math.exp(-1) + 1e-6 and scaled.edge_weight.min() < math.exp(-1)
    adj = normalized_adjacency(graph.edge_index, graph.edge_weight, graph.n).to_dense()
    degree = 1 + expected[0] + expected[1]  # vertex 0: self-loop + edges to 1 and 2 (same for all)
    assert torch.allclose(adj, adj.T) and adj[0, 1] == pytest.approx(float(expected[0] / degree))
    assert adj[0, 3] == 0


def test_superpixels_recover_flat_regions_and_refuse_impossible_requests():
    big = QUADRANTS.repeat_interleave(4, 0).repeat_interleave(4, 1)  # 16x16, four 8x8 quadrants
    labels = superpixels(features_of(big, QUADRANT_FEATURES), n=4, compactness=0.5)
    assert labels.unique().numel() == 4
    for q in range(4):  # each quadrant is exactly one superpixel
        assert labels[big == q].unique().numel() == 1
    with pytest.raises(WeakLabelError, match="superpixels"):
        superpixels(torch.zeros(2, 3, 3), n=10)


def test_count_rule_by_vertex_number_without_and_with_error():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0, 0.4, 0.6, 0.5])
    exact = vertex_labels(scores, ratio=0.3)
    assert (exact == FOREGROUND).sum() == 3 and (exact == BACKGROUND).sum() == 7
    assert set(torch.nonzero(exact == FOREGROUND).flatten().tolist()) == {1, 3, 5}  # the top 3
    banded = vertex_labels(scores, ratio=0.3, error=0.1)
    assert [(banded == v).sum().item() for v in (FOREGROUND, IGNORED, BACKGROUND)] == [2, 2, 6]
    assert set(torch.nonzero(banded == IGNORED).flatten().tolist()) == {5, 8}  # ranks 3 and 4
    assert count_bounds(torch.ones(10), 0.0) == (0, 10) and count_bounds(torch.ones(10), 1.0) == (10, 0)
    assert count_bounds(torch.ones(10), 0.05, error=0.25) == (0, 7)  # r - e clamps at 0
    with pytest.raises(WeakLabelError, match="must lie in"):
        vertex_labels(scores, ratio=1.2)


def test_count_rule_by_area_differs_from_vertex_count_on_unequal_superpixels():
    scores, area = torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([50, 10, 10, 30])
    assert (vertex_labels(scores, 0.5) == FOREGROUND).tolist() == [True, True, False, False]
    assert (vertex_labels(scores, 0.5, area=area) == FOREGROUND).tolist() == [True, False, False, False]
    # r ± e by area: 0.4 → nearest prefix is vertex 0 (0.5); 0.6 → vertices 0-1 (0.6): 1 is ignored
    assert vertex_labels(scores, 0.5, 0.1, area=area).tolist() == [FOREGROUND, IGNORED, BACKGROUND, BACKGROUND]


def test_boundary_prior_ranks_the_region_unlike_any_border_superpixel_first():
    labels = torch.zeros(6, 6, dtype=torch.long)
    labels[:, 3:] = 1
    labels[2:4, 2:4] = 2  # an inner square, touching no border
    colours = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 2.0, 0.5]])  # black | white | other
    graph = build_graph(features_of(labels, colours), labels)
    scores = boundary_contrast(graph, colour=3)
    assert scores[:2].tolist() == [0, 0] and scores[2] > 0  # border vertices match themselves


def test_ignored_pixels_and_vertices_carry_no_loss():
    target = torch.tensor([[[[1.0, 0.0], [IGNORE, IGNORE]]]])
    logits = torch.zeros(1, 1, 2, 2, requires_grad=True)
    loss = dice_bce_loss(logits, target)
    loss.backward()
    assert torch.all(logits.grad[0, 0, 1] == 0) and torch.all(logits.grad[0, 0, 0] != 0)
    moved = torch.tensor([[[[0.0, 0.0], [9.0, -9.0]]]])  # anything on ignored pixels: same loss
    assert dice_bce_loss(moved, target).item() == pytest.approx(loss.item())

    graph = build_graph(features_of(QUADRANTS, QUADRANT_FEATURES), QUADRANTS)
    pixel_target = torch.tensor([FOREGROUND, BACKGROUND, IGNORED, IGNORED])[QUADRANTS].float()
    vertex_logits = torch.zeros(4, requires_grad=True)
    vertex_loss([graph], vertex_logits, pixel_target[None, None]).backward()
    assert vertex_logits.grad[2:].abs().sum() == 0 and torch.all(vertex_logits.grad[:2] != 0)


def _logits_of_area(area: float, pixels: int = 100) -> torch.Tensor:
    """(1, 1, 1, pixels) constant logits whose mean sigmoid is ``area``."""
    return torch.full((1, 1, 1, pixels), math.log(area / (1 - area)), requires_grad=True)


def test_size_loss_is_zero_inside_the_band_and_pulls_the_area_into_it():
    r, e = torch.tensor([0.3]), torch.tensor([0.1])
    for area in (0.21, 0.3, 0.39):
        assert size_loss(_logits_of_area(area), r, e).item() == pytest.approx(0, abs=1e-9)
    below = [size_loss(_logits_of_area(a), r, e).item() for a in (0.15, 0.1, 0.05)]
    above = [size_loss(_logits_of_area(a), r, e).item() for a in (0.45, 0.5, 0.6)]
    assert below[0] == pytest.approx(0.05 ** 2, rel=1e-4) and above[0] == pytest.approx(0.05 ** 2, rel=1e-4)
    assert 0 < below[0] < below[1] < below[2] and 0 < above[0] < above[1] < above[2]
    # the gradient raises a too-small area and lowers a too-large one, on every pixel alike
    for area, sign in ((0.1, -1), (0.6, 1)):
        logits = _logits_of_area(area)
        size_loss(logits, r, e).backward()
        assert torch.all(torch.sign(logits.grad) == sign)
    # per sample: one image in its band, one above it → half the second one's penalty
    two = torch.cat([_logits_of_area(0.3), _logits_of_area(0.6)]).detach()
    assert size_loss(two, torch.tensor([0.3, 0.3]), torch.tensor([0.1, 0.1])).item() == pytest.approx(
        0.2 ** 2 / 2, rel=1e-4)


def test_gcn_plus_head_ranks_by_the_mean_of_both_probabilities():
    graph = build_graph(features_of(QUADRANTS, QUADRANT_FEATURES), QUADRANTS)
    gcn = torch.tensor([0.9, 0.8, 0.1, 0.2])  # GCN order 0 1 3 2
    head = torch.tensor([0.0, 0.5, 0.95, 0.3])  # head order 2 1 3 0 → mean 0.45 0.65 0.525 0.25
    logit = lambda p: torch.log(p / (1 - p.clamp(max=1 - 1e-6))).clamp(min=-30)  # noqa: E731
    pixel_logits, vertex_logits = logit(head)[QUADRANTS], logit(gcn)
    order = {ranking: torch.argsort(vertex_scores(ranking, graph, pixel_logits, vertex_logits, 2),
                                    descending=True).tolist() for ranking in ("gcn", "head", "gcn+head")}
    assert order == {"gcn": [0, 1, 3, 2], "head": [2, 1, 3, 0], "gcn+head": [1, 2, 0, 3]}
    assert torch.allclose(vertex_scores("gcn+head", graph, pixel_logits, vertex_logits, 2),
                          torch.tensor([0.45, 0.65, 0.525, 0.25]), atol=1e-5)
    # a quarter of the image is lesion: the averaged ranking paints vertex 1, which neither tops alone
    scores = vertex_scores("gcn+head", graph, pixel_logits, vertex_logits, 2)
    assert vertex_labels(scores, 0.25, area=graph.area).tolist() == [BACKGROUND, FOREGROUND, BACKGROUND,
                                                                     BACKGROUND]


@pytest.mark.parametrize("override, message", [
    ("weak_label.size_weight=-1", "weak_label.size_weight: Input should be greater than or equal to 0"),
    ("weak_label.rank_by=head", "weak_label.rank_by: Input should be 'gcn' or 'gcn\\+head'")])
def test_size_and_ranking_settings_reject_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_validation_dice_skips_ignored_pixels():
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 1, 2, 2)  # predicts lesion everywhere

    data = [(torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [IGNORE, IGNORE]]]), torch.tensor(1.0))]
    assert validation_dice(Constant(), data, torch.device("cpu"), 1) == pytest.approx(1.0)


def test_ignore_png_round_trip(tmp_path):
    target = np.array([[1, 0], [-1, -1]], np.int8)
    png = to_png(target, 4, 4)
    assert set(np.unique(png)) == {0, 255, IGNORE_VALUE}
    Image.fromarray(png).save(tmp_path / "m.png")

    class R:  # the two fields the loaders read
        mask, id, kind = "m.png", "x", "pseudo_label"

    assert load_target(tmp_path, R, 2).tolist() == target.tolist()
    assert load_mask(tmp_path, R).sum() == 4  # only the lesion quarter; ignore is not lesion


SMALL = ["synthetic.n_images=16", "synthetic.n_videos=0", "synthetic.n_weak=8", "synthetic.size=32",
         "model.base_channels=4", "model.depth=2", "train.image_size=32", "train.batch_size=4",
         "weak_label.epochs=2", "weak_label.n_superpixels=16", "weak_label.n_logged=1"]


@pytest.fixture
def weak_project(tmp_path):
    params = config.load(None, SMALL + [f"runtime.workdir={tmp_path / 'work'}"])
    build_dataset(params, tmp_path / "dataset")
    tracking.connect(params)
    yield params, tmp_path / "dataset"
    mlflow.end_run()


def test_weaken_keeps_true_ratios_and_leaves_val_test_alone(weak_project, tmp_path):
    _, dataset = weak_project
    before = {r.id: r for r in read_manifest(dataset)}
    after = {r.id: r for r in weaken(dataset, tmp_path / "weak", noise=0.05, seed=1)}
    assert after == {r.id: r for r in read_manifest(tmp_path / "weak")}
    weakened = [i for i, r in after.items() if before[i].kind != "weak" and r.kind == "weak"]
    assert weakened and all(before[i].split == "train" for i in weakened)
    for i in weakened:
        truth = load_mask(dataset, before[i]).mean()
        assert after[i].mask is None and after[i].area_error == 0.05
        assert abs(after[i].area_ratio - truth) <= 0.05 + 1e-6
    assert all(after[i] == before[i] for i in after if before[i].split != "train")
    with pytest.raises(WeakLabelError, match="unknown split"):
        weaken(dataset, tmp_path / "x", splits=["training"])
    with pytest.raises(WeakLabelError, match="fraction"):
        weaken(dataset, tmp_path / "y", fraction=1.5)
    # the command line: same function, named error instead of a traceback
    assert cli.main(["weaken", "--dataset", str(dataset), "--out", str(tmp_path / "z"),
                     "--fraction", "0.5"]) == 0
    assert sum(r.kind == "weak" for r in read_manifest(tmp_path / "z")) < len(weakened) + sum(
        r.kind == "weak" for r in before.values())
    assert cli.main(["weaken", "--dataset", str(dataset), "--out", str(tmp_path / "z")]) == 2


def test_pseudo_label_step_turns_weak_records_into_ignore_aware_pseudo_labels(weak_project, tmp_path, capsys):
    params, dataset = weak_project
    weak_train = [r for r in read_manifest(dataset) if r.kind == "weak" and r.split == "train"]
    assert weak_train, "the synthetic source should put some weak records in train"
    with mlflow.start_run() as run:
        pseudo_label(params, dataset, tmp_path / "out")
    # no champion yet: the user is told the ratios start from the boundary prior, and what that costs
    assert "no single-model champion to start from, so the boundary prior ranks first" in capsys.readouterr().out
    out = {r.id: r for r in read_manifest(tmp_path / "out")}
    for r in weak_train:
        new = out[r.id]
        assert new.kind == "pseudo_label" and new.score_method == "weak_gcn"
        assert new.labelled_by == f"runs:/{run.info.run_id}/weak_model" and new.quality in ("good", "bad")
        png = np.asarray(Image.open(tmp_path / "out" / new.mask))
        assert png.shape == (r.height, r.width) and set(np.unique(png)) <= {0, 255, IGNORE_VALUE}
        assert (png == 255).any() and (png == 0).any()
    # area_error 0.02 on synthetic records leaves an ignore band somewhere, and training sees it as -1
    data = SegmentationDataset(tmp_path / "out", labelled(list(out.values()), "train"),
                               _model(params, dataset))
    assert (data.masks == IGNORE).any() and set(np.unique(data.masks)) <= {IGNORE, 0, 1}
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged["weak/n_weak"] == len(weak_train) and "weak/final_ignored_vertices" in logged
    # the GCN that drew them is stored with the step: its id in labelled_by is loadable
    state = torch.load(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/weak_model/weak_model.pt"))
    assert any(key.startswith("gcn.") for key in state) and any(key.startswith("segmenter.") for key in state)


def _model(params, dataset):
    from lesionflow.steps.train import new_segmenter

    return new_segmenter(params, dataset)


def test_weak_training_learns_lesions_from_area_ratios_alone(tmp_path):
    """Every train mask replaced by its area ratio: the network must still find the lesions."""
    from lesionflow.steps.train import new_segmenter
    from lesionflow.weak.train import WeakTrainingSet, fit_weak

    params = config.load(None, ["synthetic.n_images=40", "synthetic.n_videos=0", "synthetic.size=32",
                                "model.base_channels=8", "model.depth=2", "train.image_size=32",
                                "train.batch_size=4", "weak_label.epochs=4", "weak_label.n_superpixels=16"])
    build_dataset(params, tmp_path / "full")
    records = weaken(tmp_path / "full", tmp_path / "weak")
    model = new_segmenter(params, tmp_path / "weak")
    data = WeakTrainingSet(tmp_path / "weak", [], [r for r in records if r.kind == "weak"], model)
    fit_weak(model, data, params.weak_label, params.train, seed=0)
    test = labelled(records, "test")
    preds = model.predict_proba([np.asarray(Image.open(tmp_path / "weak" / r.image)) for r in test])
    scores = [dice(p > 0.5, load_mask(tmp_path / "weak", r)) for p, r in zip(preds, test, strict=True)]
    assert np.mean(scores) > 0.5, scores


def test_size_weight_pulls_the_predicted_area_toward_the_ratios(tmp_path):
    """Two weak epochs from the same weights with the pixel and vertex losses off, so only the size
    penalty can move the network: with ``size_weight`` 10 the predicted lesion share ends nearer
    the records' area ratios than with 0 (the penalty is logged either way)."""
    from lesionflow.steps.train import new_segmenter
    from lesionflow.weak.train import WeakTrainingSet, fit_weak

    small = ["synthetic.n_images=16", "synthetic.n_videos=0", "synthetic.size=32", "model.base_channels=4",
             "model.depth=2", "train.image_size=32", "train.batch_size=4", "train.lr=0.03",
             "train.dice_weight=0", "train.bce_weight=0", "weak_label.gcn_weight=0", "weak_label.epochs=2",
             "weak_label.n_superpixels=16"]
    build_dataset(config.load(None, small), tmp_path / "full")
    weak = [r for r in weaken(tmp_path / "full", tmp_path / "weak") if r.kind == "weak"]
    gap, logged = {}, {}
    for weight in (0.0, 10.0):
        params = config.load(None, [*small, f"weak_label.size_weight={weight}"])
        torch.manual_seed(0)  # the same initial weights for both
        model = new_segmenter(params, tmp_path / "weak")
        data = WeakTrainingSet(tmp_path / "weak", [], weak, model)
        logged[weight] = fit_weak(model, data, params.weak_label, params.train, seed=0).history[-1]["size_loss"]
        model.train()  # batch statistics: two epochs leave BatchNorm's running ones far off
        with torch.no_grad():
            area = torch.sigmoid(model(torch.from_numpy(data.images).float())).flatten(1).mean(1).numpy()
        gap[weight] = float(np.abs(area - np.array(data.ratios)).mean())
    assert 0 < logged[10.0] < 0.7 * logged[0.0], logged
    assert gap[10.0] < 0.8 * gap[0.0], gap
