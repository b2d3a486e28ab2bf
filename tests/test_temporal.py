"""Temporal consistency (issue 16 part 4): the metric on hand-built sequences, its columns in the
evaluate step's tables (video frames only), and the gate's max_temporal_drop; what the evaluate
step's frames/s counts."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
from PIL import Image

from lesionflow import registry as reg
from lesionflow.data.manifest import Record
from lesionflow.metrics import temporal_consistency
from lesionflow.steps import evaluate
from lesionflow.steps.evaluate import same_pairs, score_model

SIZE = 20


def square(left: int, top: int = 5, side: int = 10) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[top:top + side, left:left + side] = True
    return m


def test_mean_dice_of_consecutive_masks_per_sequence():
    # shifted by 5 px of a 10 px side: Dice 0.5 per step; given out of order, sorted by frame_index
    a = {"a": [(7, square(10)), (0, square(0)), (2, square(5))]}
    assert temporal_consistency(a) == pytest.approx(0.5)
    # out of order, the same masks would have scored 0 (frames 0 and 10 px apart do not overlap)
    assert temporal_consistency({"a": [(0, square(0)), (1, square(10))]}) == 0.0
    # mean over sequences, not over pairs: "b" (one pair, Dice 1) weighs as much as "a" (two)
    # both-empty pairs count as 1, as dice does; one-frame sequences add nothing
    empty = np.zeros((SIZE, SIZE), bool)
    assert temporal_consistency({**a, "b": [(0, empty), (1, empty)], "c": [(0, square(3))]}) == pytest.approx(0.75)
    assert math.isnan(temporal_consistency({"c": [(0, square(3))]}))
    assert math.isnan(temporal_consistency({}))


class ImageIsMask:
    """A model whose prediction is the image's lit pixels: what it predicts is set by the test."""

    def predict_proba(self, images, lesion_types):
        return [(np.asarray(image)[..., 0] > 0).astype(np.float32) for image in images]


def write(dataset, rid: str, pred: np.ndarray, truth: np.ndarray, lesion_type: str, group: str,
          frame: int | None) -> Record:
    for folder, mask in (("images", pred), ("masks", truth)):
        (dataset / folder).mkdir(parents=True, exist_ok=True)
        pixels = np.repeat(mask[..., None] * 255, 3, axis=2) if folder == "images" else mask * 255
        Image.fromarray(pixels.astype(np.uint8)).save(dataset / folder / f"{rid}.png")
    return Record(id=rid, kind="still" if frame is None else "video_frame", image=f"images/{rid}.png",
                  mask=f"masks/{rid}.png", image_sha256=rid, mask_sha256=rid, height=SIZE, width=SIZE,
                  channels=3, lesion_type=lesion_type, group=group, split="test", frame_index=frame,
                  source=rid)


def test_score_model_adds_temporal_columns_for_video_frames_only(tmp_path):
    stills = [write(tmp_path, "s1", square(0), square(0), "c", "s1", None),
              write(tmp_path, "s2", square(5), square(0), "c", "s2", None)]
    base = set(score_model(ImageIsMask(), tmp_path, stills, 0.5).table["overall"])
    assert not any(k.startswith("temporal") for k in base)

    # "a": predictions step 5 px per frame (Dice 0.5), truth still (1.0): flickers, gap -0.5;
    # "b": prediction still (1.0), truth steps (0.5): smoother than the truth, gap +0.5;
    # "lone": one frame, no pair. Ids sort differently from frame order (f10 < f2).
    frames = [write(tmp_path, "a_f0", square(0), square(0), "a", "a", 0),
              write(tmp_path, "a_f2", square(5), square(0), "a", "a", 2),
              write(tmp_path, "a_f10", square(10), square(0), "a", "a", 10),
              write(tmp_path, "b_f0", square(3), square(0), "b", "b", 0),
              write(tmp_path, "b_f1", square(3), square(5), "b", "b", 1),
              write(tmp_path, "lone", square(3), square(3), "b", "lone", 4)]
    records = stills + frames
    random.Random(0).shuffle(records)
    score = score_model(ImageIsMask(), tmp_path, records, 0.5)
    table = score.table
    assert set(table["overall"]) == base | {"temporal_dice", "temporal_gap"}
    assert table["a"]["temporal_dice"] == pytest.approx(0.5) and table["a"]["temporal_gap"] == pytest.approx(-0.5)
    assert table["b"]["temporal_dice"] == pytest.approx(1.0) and table["b"]["temporal_gap"] == pytest.approx(0.5)
    assert table["overall"]["temporal_dice"] == pytest.approx(0.75)
    assert table["overall"]["temporal_gap"] == pytest.approx(0.0)
    assert math.isnan(table["c"]["temporal_dice"])  # stills only: no pair
    assert table["overall"]["n"] == 8
    # a subset keeps the pairs whose two frames are both in it (the compared records)
    sub = score.subset({"a_f0", "a_f2", "b_f0"})
    assert sub["overall"]["temporal_dice"] == pytest.approx(0.5)
    assert sub["overall"]["temporal_gap"] == pytest.approx(-0.5)
    # the champion, scored on the compared records only, pairs a_f0 with a_f10 across the left-out
    # a_f2: that pair is dropped so both tables rest on the same pairs (a_f0 → a_f2 is kept)
    compared = [r for r in records if r.id != "a_f2"]
    champion = score_model(ImageIsMask(), tmp_path, compared, 0.5).rows
    assert {r["id"]: r.get("prev_id") for r in champion}["a_f10"] == "a_f0"
    kept = {r["id"]: r.get("prev_id") for r in same_pairs(champion, score.rows)}
    assert kept["a_f10"] is None and kept["b_f1"] == "b_f0"
    assert set(same_pairs(champion, score.rows)[0]) >= {"id", "dice", "lesion_type"}


class SlowImageIsMask(ImageIsMask):
    def predict_proba(self, images, lesion_types):
        time.sleep(0.02)
        return super().predict_proba(images, lesion_types)


def test_frames_per_second_counts_the_prediction_not_the_scoring(tmp_path, monkeypatch):
    """The summary's "inference frames/s" is what serving would reach: scoring a frame (HD95's
    distance transforms) and reading it from disk are the evaluation's own work, not the model's."""
    image_metrics = evaluate.image_metrics

    def slow_metrics(*args, **kwargs):
        time.sleep(0.06)
        return image_metrics(*args, **kwargs)

    monkeypatch.setattr(evaluate, "image_metrics", slow_metrics)
    records = [write(tmp_path, f"s{i}", square(i), square(0), "c", f"s{i}", None) for i in range(5)]
    # 20 ms per prediction: at most 50 frames/s; the 60 ms of scoring per frame would make it < 12.5
    assert 30 < score_model(SlowImageIsMask(), tmp_path, records, 0.5).fps <= 50


def table(dice: float, temporal: float | None = None) -> dict[str, dict[str, float]]:
    row = {"n": 10, "dice": dice}
    return {"overall": row if temporal is None else {**row, "temporal_dice": temporal, "temporal_gap": 0.0}}


def test_gate_refuses_a_temporal_drop_beyond_max_temporal_drop():
    refused = reg.gate(table(0.80, 0.70), table(0.80, 0.90), max_temporal_drop=0.1)
    assert not refused.promote and len(refused.refusals) == 1
    assert "temporal_dice=0.7000 < champion 0.9000" in refused.reason and "max_temporal_drop 0.1000" in refused.reason
    within = reg.gate(table(0.80, 0.85), table(0.80, 0.90), max_temporal_drop=0.1)
    assert within.promote and "temporal_dice drops no more than 0.1000" in within.reason
    # not configured: not checked
    assert reg.gate(table(0.80, 0.10), table(0.80, 0.90)).promote
    # a champion registered before the metric (or on stills): no refusal, nothing said about it
    older = reg.gate(table(0.80, 0.10), table(0.80), max_temporal_drop=0.1)
    assert older.promote and "temporal" not in older.reason
    # a lower Dice is still refused on its own, with the temporal refusal beside it
    both = reg.gate(table(0.60, 0.10), table(0.80, 0.90), max_temporal_drop=0.1)
    assert not both.promote and len(both.refusals) == 2
