"""The residual U-Net, the structure loss, augmentation random streams and the shared loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lesionflow import lineage
from lesionflow import loop as loop_module
from lesionflow.config import Params, TrainConfig
from lesionflow.data.augment import Augmenter
from lesionflow.loop import TrainingLoop, uses_bf16
from lesionflow.losses import IGNORE, structure_loss, structure_pixel_weight
from lesionflow.models import build_model
from lesionflow.models.resunet import ResUNet
from lesionflow.models.segmenter import Segmenter
from lesionflow.reproduce import training_as_registered
from lesionflow.training import (
    BatchRescaler,
    SegmentationDataset,
    fit,
    reseed_worker,
    training_loss,
)


def test_resunet_features_then_head_equal_forward_and_aux_heads_are_full_size():
    torch.manual_seed(0)
    net = ResUNet(3, 8, 3).eval()
    x = torch.randn(2, 3, 64, 96)
    assert net(x).shape == (2, 1, 64, 96)
    torch.testing.assert_close(net.head(net.features(x)), net(x), atol=1e-5, rtol=1e-4)
    outs = net.forward_all(x)
    assert len(outs) == 3 and all(o.shape == (2, 1, 64, 96) for o in outs)
    torch.testing.assert_close(outs[0], net(x))
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.zeros(1, 3, 40, 40))


def test_a_saved_resunet_loads_as_itself(tmp_path):
    params = Params.model_validate({"model": {"arch": "resunet", "base_channels": 8, "depth": 2},
                                    "train": {"image_size": 32}})
    model = Segmenter(build_model(params.model), 32, [100.0] * 3, [50.0] * 3).eval()
    model.save(tmp_path / "m.pt")
    loaded = Segmenter.load(tmp_path / "m.pt").eval()
    assert isinstance(loaded.net, ResUNet) and loaded.net.hparams == model.net.hparams
    x = torch.rand(1, 3, 32, 32) * 255
    torch.testing.assert_close(loaded(x), model(x))


def test_resunet_sizes_and_deep_supervision_are_checked_up_front():
    with pytest.raises(ValueError, match="multiple of 32 .*set train.image_size to 64 or 96"):
        Params.model_validate({"model": {"arch": "resunet"}, "train": {"image_size": 80}})
    with pytest.raises(ValueError, match="deep_supervision needs model.arch: resunet"):
        Params.model_validate({"train": {"deep_supervision": 0.5}})
    assert Params.model_validate({"train": {"augment": True}}).train.augment == "flips"
    assert Params.model_validate({"train": {"augment": False}}).train.augment == "none"


def test_structure_loss_ignores_ignored_pixels_and_weighs_the_edge_more():
    target = torch.zeros(1, 1, 44, 44)
    target[..., 12:32, 12:32] = 1
    perfect = (target * 2 - 1) * 8
    # whatever the logits say where the label is IGNORE changes nothing
    ignored = target.clone()
    ignored[..., :6, :] = IGNORE
    noisy = perfect.clone()
    noisy[..., :6, :] = torch.randn(1, 1, 6, 44) * 5
    assert structure_loss(noisy, ignored).item() == pytest.approx(structure_loss(perfect, ignored).item(), abs=1e-6)
    # the same number of wrong pixels costs more on the lesion's edge than far from it
    edge, far = perfect.clone(), perfect.clone()
    edge[..., 11, 12:32] = 8   # the row just above the lesion
    far[..., 42, 12:32] = 8    # a row at the bottom of the image
    assert structure_loss(edge, target) > structure_loss(far, target) > structure_loss(perfect, target)


def test_structure_pixel_weight_is_the_clipped_window_mean_of_the_label():
    """The two 1-D passes equal one k×k window mean, border windows clipped (PraNet's weights)."""
    target = (torch.rand(2, 1, 44, 60, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    target[0, 0, :3] = IGNORE
    truth, k = target.clamp(min=0), 44 // 11 | 1
    local = torch.nn.functional.avg_pool2d(truth, k, stride=1, padding=k // 2, count_include_pad=False)
    expected = (1 + 5 * (local - truth).abs()) * (target != IGNORE)
    torch.testing.assert_close(structure_pixel_weight(target), expected, atol=1e-6, rtol=1e-5)


def test_deep_supervision_adds_the_coarser_levels_loss():
    torch.manual_seed(0)
    model = Segmenter(ResUNet(3, 8, 2), 32, [0.0] * 3, [1.0] * 3)
    image, mask, weight = torch.rand(2, 3, 32, 32) * 255, (torch.rand(2, 1, 32, 32) > 0.5).float(), torch.ones(2)
    plain = training_loss(model, image, mask, weight, TrainConfig(loss="structure"))
    deep = training_loss(model, image, mask, weight, TrainConfig(loss="structure", deep_supervision=1.0))
    assert deep.item() > plain.item()


class _Arrays(SegmentationDataset):
    def __init__(self, n: int, strength: str):
        self.images = np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        self.masks = np.zeros((n, 1, 32, 32), np.int8)
        self.masks[:, :, 8:20, 8:24] = 1
        self.weights = np.ones(n, np.float32)
        self.augmenter = Augmenter(strength, 0)


def _epochs(strength: str, workers: int, seed: int = 0) -> list[torch.Tensor]:
    data = _Arrays(8, strength)
    loader = DataLoader(data, batch_size=2, shuffle=False, num_workers=workers, worker_init_fn=reseed_worker,
                        generator=torch.Generator().manual_seed(seed))
    return [torch.cat([mask for _, mask, _ in loader]) for _ in range(2)]


@pytest.mark.parametrize("strength", ["flips", "strong"])
def test_each_worker_and_each_epoch_draws_its_own_augmentation(strength):
    first, second = _epochs(strength, workers=2)
    # the same image in two epochs is augmented differently (not the same draws replayed)
    assert not torch.equal(first, second)
    # samples 0-1 (worker 0) and 2-3 (worker 1) hold the same mask before augmentation; the
    # two workers must not apply the same sequence of transforms
    assert not torch.equal(first[0:2], first[2:4])
    # ...and a rerun with the same seed draws the same numbers again
    rerun = _epochs(strength, workers=2)
    assert torch.equal(rerun[0], first) and torch.equal(rerun[1], second)


def test_strong_augmentation_keeps_ignore_pixels_and_labels():
    target = np.zeros((1, 48, 48), np.int8)
    target[0, 10:30, 10:30] = 1
    target[0, :, :4] = IGNORE
    augment = Augmenter("strong", 1)
    for _ in range(10):
        image, out = augment(np.full((3, 48, 48), 128, np.uint8), target)
        assert image.dtype == np.float32 and image.shape == (3, 48, 48)
        assert set(np.unique(out)) <= {IGNORE, 0.0, 1.0}
        assert (out == 1).sum() > 0


def test_the_loop_ships_and_selects_the_moving_average():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    loop = TrainingLoop(model, lr=0.1, total_steps=20, ema_decay=0.9)
    x = torch.randn(16, 4)
    for step in range(20):
        loop.step((model(x) - 1).pow(2).mean())
        if step == 5:
            loop.select(step, 1.0)
            kept = {k: v.clone() for k, v in loop.shipped.state_dict().items()}
        if step == 10:
            assert not loop.select(step, 0.5)  # worse: not kept
    assert loop.best_at == 5
    assert not torch.equal(loop.shipped.weight, model.weight)  # the average lags the weights
    loop.finish()
    assert torch.equal(model.weight, kept["weight"]) and torch.equal(model.bias, kept["bias"])


class _Clock:
    """``time.monotonic`` for the loop, advanced by hand: a budget test that does not sleep."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_budget_too_short_for_the_epochs_shortens_the_schedule_so_it_still_anneals(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(loop_module.time, "monotonic", clock)
    model = torch.nn.Linear(4, 1)
    # 10 epochs of 10 steps planned; 60 s allowed; each epoch takes 20 s
    loop = TrainingLoop(model, lr=0.1, total_steps=100, max_minutes=1)
    x, epochs, done = torch.randn(8, 4), 10, 0
    while done < epochs:
        for _ in range(10):
            last_lr = loop.lr  # the rate the step below takes
            loop.step(model(x).pow(2).mean())
        clock.now += 20
        done += 1
        epochs = loop.epochs_in_budget(done, epochs)
        assert epochs == 3  # decided after the first epoch: 20 s + 2 × 20 s fit in 60 s
    assert loop.scheduler.last_epoch == 30
    assert last_lr == pytest.approx(0.1 / 25 / 1e4)  # the last step annealed fully, not cut near the peak


def test_a_budget_the_epochs_fit_in_changes_nothing(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(loop_module.time, "monotonic", clock)
    loop = TrainingLoop(torch.nn.Linear(4, 1), lr=0.1, total_steps=40, max_minutes=10)
    for done in range(1, 4):
        clock.now += 60
        assert loop.epochs_in_budget(done, 4) == 4
    assert loop.scheduler.total_steps == 40


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_in_either_precision_learns_and_ships_plain_fp32_weights(precision):
    torch.manual_seed(0)
    model = Segmenter(ResUNet(3, 8, 2), 32, [0.0] * 3, [1.0] * 3)
    data = _Arrays(16, "none")
    cfg = TrainConfig(image_size=32, batch_size=4, epochs=4, lr=0.01, loss="structure", deep_supervision=0.4,
                      precision=precision)
    result = fit(model, data, data, cfg, seed=0)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    for tensor in model.state_dict().values():
        assert tensor.dtype in (torch.float32, torch.int64)
        assert tensor.is_contiguous()  # trained channels-last, shipped in the default layout


def test_multi_scale_batches_take_every_side_and_keep_the_targets_three_values():
    rescale = BatchRescaler([0.75, 1.0, 1.25, 0.01], 256, 32, seed=0)
    assert rescale.sides == [32, 192, 256, 320]  # rounded to the multiple, never below it
    image = torch.rand(2, 3, 256, 256) * 255
    target = torch.randint(-1, 2, (2, 1, 256, 256)).float()
    seen = set()
    for _ in range(40):
        scaled_image, scaled_target = rescale(image, target)
        side = scaled_image.shape[-1]
        seen.add(side)
        assert scaled_image.shape == (2, 3, side, side) and scaled_target.shape == (2, 1, side, side)
        assert set(scaled_target.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert seen == {32, 192, 256, 320}
    one_scale = BatchRescaler([1.0], 256, 32, seed=0)
    assert one_scale(image, target)[0] is image
    with pytest.raises(ValueError, match="scales must all be > 0"):
        TrainConfig(scales=[1.0, 0.0])


def test_multi_scale_training_learns_and_validates_at_the_models_own_size():
    torch.manual_seed(0)
    model = Segmenter(ResUNet(3, 8, 2), 32, [0.0] * 3, [1.0] * 3)
    data = _Arrays(16, "none")
    cfg = TrainConfig(image_size=32, batch_size=4, epochs=4, lr=0.01, loss="structure",
                      deep_supervision=0.4, scales=[0.5, 1.0, 1.5])
    sides = []
    model.net.stem.register_forward_pre_hook(
        lambda _, inputs: sides.append(inputs[0].shape[-1]) if model.training else None)
    result = fit(model, data, data, cfg, seed=0)
    assert set(sides) == {16, 32, 48}
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert 0 <= result.best_val_dice <= 1


def test_fit_under_a_budget_its_epochs_do_not_fit_ends_early_and_says_how_many_it_ran():
    torch.manual_seed(0)
    model = Segmenter(ResUNet(3, 8, 2), 32, [0.0] * 3, [1.0] * 3)
    data = _Arrays(8, "none")
    cfg = TrainConfig(image_size=32, batch_size=4, epochs=5, max_minutes=1e-4)  # 6 ms: one epoch is longer
    result = fit(model, data, data, cfg, seed=0)
    assert result.epochs_run == len(result.history) == 1 and result.best_epoch == 0


def test_reproduce_trains_for_the_epochs_the_budget_chose_without_a_clock():
    params = Params().with_section("train", epochs=40, max_minutes=50)
    same, notes = training_as_registered(params, {lineage.TAG_GIT_COMMIT: "abc"})
    assert same == params and notes == []
    rebuilt, notes = training_as_registered(params, {lineage.TAG_TRAINED_EPOCHS: "17"})
    assert (rebuilt.train.epochs, rebuilt.train.max_minutes) == (17, None)
    assert "after 17 of 40 epochs" in notes[0]


def test_reproduce_trains_in_the_precision_auto_chose_where_the_version_trained():
    auto = Params().with_section("train", precision="auto")
    for trained in ("fp32", "bf16"):  # the registering machine's CPU decided, not this one's
        rebuilt, notes = training_as_registered(auto, {lineage.TAG_TRAINED_PRECISION: trained})
        assert rebuilt.train.precision == trained and f"resolved to {trained}" in notes[0]
    # asked for explicitly: nothing to pin; registered before the tag existed: nothing known
    assert training_as_registered(Params().with_section("train", precision="fp32"),
                                  {lineage.TAG_TRAINED_PRECISION: "fp32"})[1] == []
    assert training_as_registered(auto, {lineage.TAG_TRAINED_PRECISION: lineage.NONE})[1] == []


def test_fit_says_what_precision_auto_resolved_to():
    model = Segmenter(ResUNet(3, 8, 2), 32, [0.0] * 3, [1.0] * 3)
    data = _Arrays(4, "none")
    for precision in ("fp32", "bf16"):
        result = fit(model, data, data, TrainConfig(image_size=32, batch_size=4, epochs=1, precision=precision), seed=0)
        assert result.precision == precision
    auto = fit(model, data, data, TrainConfig(image_size=32, batch_size=4, epochs=1, precision="auto"), seed=0)
    assert auto.precision == ("bf16" if uses_bf16("auto", torch.device("cpu")) else "fp32")


@pytest.mark.parametrize(("tta", "views"), [("h", 2), ("hv", 4)])
def test_test_time_flips_average_the_flipped_views_and_survive_a_save(tta, views, tmp_path):
    torch.manual_seed(0)
    model = Segmenter(ResUNet(3, 8, 2), 32, [0.0] * 3, [1.0] * 3, tta).eval()
    x = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        flipped = [(3,), (2,), (2, 3)][:views - 1]
        by_hand = (torch.sigmoid(model(x)) + sum(torch.sigmoid(model(x.flip(d))).flip(d) for d in flipped)) / views
        assert torch.allclose(model.probabilities(x), by_hand, atol=1e-6)
        # each flip the model averages over, its answer follows
        for dims in flipped:
            assert torch.allclose(model.probabilities(x.flip(dims)), model.probabilities(x).flip(dims), atol=1e-5)
        assert not torch.allclose(model.probabilities(x), torch.sigmoid(model(x)), atol=1e-3)
    model.save(tmp_path / "m.pt")
    assert Segmenter.load(tmp_path / "m.pt").tta == tta
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    del blob["tta"]  # saved before test-time flips existed
    torch.save(blob, tmp_path / "old.pt")
    assert Segmenter.load(tmp_path / "old.pt").tta == "none"
