"""Meta-training: the outer update matches the MAML maths, BatchNorm statistics stay honest, the
curriculum follows performance, corrections weigh what they should, and it learns a toy problem."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lesionflow import meta
from lesionflow.config import MetaTrainConfig
from lesionflow.data.augment import Augmenter
from lesionflow.losses import dice_bce_loss
from lesionflow.meta import (
    Batch,
    Pool,
    Task,
    default_loss,
    draw,
    meta_step,
    meta_train,
    order_tasks,
)
from lesionflow.models.resunet import ResUNet
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet
from lesionflow.training import SegmentationDataset, validation_dice

ALPHA, ETA = 0.1, 0.05


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets gain nothing from threads, and on a busy 2-core box two threads fight (≈10×)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ArrayDataset(SegmentationDataset):
    """A ``SegmentationDataset`` from in-memory arrays (no files to decode)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        self.images, self.masks = images, masks
        self.weights = np.ones(len(images), np.float32)
        self.augmenter = Augmenter("none", 0)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 1, 1)).double()


def by_hand(w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``tiny_net`` written out, so the reference owns its parameter tensors."""
    return F.conv2d(torch.tanh(F.conv2d(x, w[0], w[1], padding=1)), w[2], w[3])


def batches(seed: int = 1) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64)
    y = (torch.rand(6, 1, 16, 16, generator=g) > 0.6).double()
    w = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    return Batch(x[:3], y[:3], w[:3]), Batch(x[3:], y[3:], w[3:])


def reference(net: nn.Module, support: Batch, query: Batch, second: bool) -> list[torch.Tensor]:
    """θ − η ∇ L_query(θ'), θ' = θ − α ∇ L_support(θ); the gradient is taken w.r.t. θ' (first
    order) or w.r.t. θ through the inner step (second order)."""
    theta = [p.detach().clone().requires_grad_() for p in net.parameters()]
    g = torch.autograd.grad(default_loss(by_hand(theta, support.image), support.mask, support.weight),
                            theta, create_graph=second)
    fast = [t - ALPHA * gi for t, gi in zip(theta, g)]
    if not second:
        fast = [f.detach().requires_grad_() for f in fast]
    q = default_loss(by_hand(fast, query.image), query.mask, query.weight)
    gq = torch.autograd.grad(q, theta if second else fast)
    return [(t - ETA * gi).detach() for t, gi in zip(theta, gq)]


def outer_update(order: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    net = tiny_net()
    support, query = batches()
    expected = reference(net, support, query, second=order == "second")
    meta_step(net, torch.optim.SGD(net.parameters(), lr=ETA), support, query,
              inner_lr=ALPHA, order=order)
    return [p.detach() for p in net.parameters()], expected


def test_first_order_outer_step_matches_the_maths():
    got, expected = outer_update("first")
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_second_order_differs_and_matches_grad_through_inner_step():
    got, expected = outer_update("second")
    first, _ = outer_update("first")
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert max((a - b).abs().max().item() for a, b in zip(got, first)) > 1e-6


def test_inner_loop_leaves_module_parameters_untouched():
    net = tiny_net()
    before = {k: (p.data_ptr(), p.detach().clone()) for k, p in net.named_parameters()}
    params = dict(net.named_parameters())
    fast, _ = meta.inner_adapt(net, params, {}, {}, batches()[0], inner_lr=ALPHA, inner_steps=3,
                               loss_fn=default_loss, create_graph=False)
    for k, p in net.named_parameters():
        assert p.data_ptr() == before[k][0] and torch.equal(p, before[k][1]) and p.grad is None
        assert not torch.equal(fast[k], p)


def test_batchnorm_running_stats_only_see_the_original_weights():
    net = Segmenter(UNet(1, 4, 1), 16, [0.5], [0.25]).double().train()
    plain = copy.deepcopy(net)
    support, query = batches()
    plain(support.image)  # one ordinary train-mode forward at θ on the support batch
    meta_step(net, torch.optim.SGD(net.parameters(), lr=ETA), support, query, inner_lr=ALPHA,
              inner_steps=3)
    for (k, b), (_, ref) in zip(net.named_buffers(), plain.named_buffers()):
        assert torch.equal(b, ref), k


@pytest.mark.parametrize("order", ["first", "second"])
def test_a_resunet_meta_steps_though_its_deep_supervision_heads_are_unused(order):
    """The meta loss reads the final logits only: the auxiliary heads get no gradient, which
    must leave them as they are, not stop training (it did: autograd refused unused weights)."""
    net = Segmenter(ResUNet(1, 4, 2), 16, [0.5], [0.25]).double().train()
    heads = [p.detach().clone() for p in net.net.aux_heads.parameters()]
    head = net.net.head.weight.detach().clone()
    support, query = batches()
    meta_step(net, torch.optim.SGD(net.parameters(), lr=ETA), support, query, inner_lr=ALPHA,
              inner_steps=2, order=order)
    assert all(torch.equal(a, b) for a, b in zip(heads, net.net.aux_heads.parameters()))
    assert not torch.equal(head, net.net.head.weight)


def test_ascending_order_is_worst_first_and_follows_performance_at_rerank(monkeypatch):
    assert order_tasks({"a": 0.7, "b": 0.2, "c": 0.5}, "ascending", None) == ["b", "c", "a"]
    calls = iter([{"sq": 0.2, "disc": 0.8}, {"sq": 0.9, "disc": 0.3}, {"sq": 0.5, "disc": 0.5}])
    monkeypatch.setattr(meta, "score_tasks", lambda *a, **k: next(calls))
    tasks = toy_tasks(n=6)
    cfg = MetaTrainConfig(outer_steps=4, rerank_every=2, support_size=2, query_size=2)
    result = meta_train(toy_model(), tasks, cfg, seed=0, device="cpu")
    assert [(o["step"], o["order"]) for o in result.orders] == [(0, ["sq", "disc"]),
                                                               (2, ["disc", "sq"])]
    assert [r["task"] for r in result.history] == ["sq", "disc", "disc", "sq"]


def test_random_order_is_a_seeded_permutation():
    scores = {n: 0.0 for n in "abcdef"}
    orders = [order_tasks(scores, "random", np.random.default_rng(s)) for s in range(5)]
    assert orders[0] == order_tasks(scores, "random", np.random.default_rng(0))
    assert all(sorted(o) == list("abcdef") for o in orders)
    assert len({tuple(o) for o in orders}) > 1


def test_correction_weight_scales_a_correction_sample_by_the_factor():
    torch.manual_seed(0)
    logits, masks = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    per_sample = [dice_bce_loss(logits[i:i + 1], masks[i:i + 1]) for i in range(2)]
    for factor in (1.0, 3.0, 5.5):
        w = torch.from_numpy(meta.sample_weights(["correction", "pseudo_label"], factor))
        total = dice_bce_loss(logits, masks, sample_weight=w) * w.sum()
        assert torch.allclose(total - per_sample[1], factor * per_sample[0], atol=1e-6)
    task = toy_tasks(n=6, kinds=["correction", "still"] * 3)[0]
    assert task.batch([0, 1, 2], 3.0, torch.device("cpu")).weight.tolist() == [3.0, 1.0, 3.0]


def test_draw_mixes_good_and_bad_and_falls_back_on_an_empty_side():
    rng = np.random.default_rng(0)
    idx, n_good, n_bad = draw(Pool([0, 1, 2, 3, 4, 5], [10, 11]), 8, 0.25, rng)
    assert (n_good, n_bad) == (6, 2) and sorted(idx[:6]) == [0, 1, 2, 3, 4, 5]
    assert set(idx[6:]) <= {10, 11}
    assert draw(Pool([0, 1], []), 4, 0.5, rng)[1:] == (4, 0)
    assert draw(Pool([], [7]), 3, 0.25, rng) == ([7, 7, 7], 0, 3)


def toy_model() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(UNet(1, 4, 1), 32, [127.0], [64.0])


def toy_tasks(n: int = 20, kinds: list[str] | None = None) -> list[Task]:
    """Bright squares on dark ground, dark discs on bright ground; the last quarter of each task is
    bad task data (its mask shifted off the lesion)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    tasks = []
    for name in ("sq", "disc"):
        images, masks = [], []
        for _ in range(n):
            cy, cx, r = *rng.integers(9, 23, 2), int(rng.integers(4, 8))
            m = (abs(yy - cy) <= r) & (abs(xx - cx) <= r) if name == "sq" else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            fg, bg = (200, 40) if name == "sq" else (30, 170)
            img = np.where(m, fg, bg) + rng.normal(0, 10, m.shape)
            images.append(np.clip(img, 0, 255).astype(np.uint8)[None])
            masks.append(m.astype(np.uint8)[None])
        masks = np.stack(masks)
        n_bad = n // 4
        masks[n - n_bad:] = np.roll(masks[n - n_bad:], 12, axis=-1)
        data = ArrayDataset(np.stack(images), masks)
        tasks.append(Task.split(name, data, range(n - n_bad), range(n - n_bad, n), kinds=kinds))
    return tasks


def test_meta_train_learns_two_toy_tasks_with_the_configured_batch_mix():
    cfg = MetaTrainConfig(outer_steps=30, support_size=4, query_size=4, bad_fraction=0.25,
                          inner_lr=0.05, outer_lr=0.02, rerank_every=10)
    tasks = toy_tasks()
    seen = []
    result = meta_train(toy_model(), tasks, cfg, seed=0, device="cpu", on_step=seen.append)
    losses = [r["outer_loss"] for r in result.history]
    assert len(losses) == 30 and seen == result.history
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all((r["support_good"], r["support_bad"], r["query_good"], r["query_bad"]) == (3, 1, 3, 1)
               for r in result.history)
    assert {r["task"] for r in result.history} == {"sq", "disc"}
    assert set(result.scores) == {"sq", "disc"} and [o["step"] for o in result.orders] == [0, 10, 20]


def test_other_task_query_and_second_order_run():
    cfg = MetaTrainConfig(outer_steps=2, support_size=2, query_size=2, query_from="other_task",
                          order="second", inner_steps=2, task_order="random")
    result = meta_train(toy_model(), toy_tasks(n=8), cfg, seed=0, device="cpu")
    assert all(r["task"] != r["query_task"] for r in result.history)
    with pytest.raises(ValueError, match="two tasks"):
        meta_train(toy_model(), toy_tasks(n=8)[:1], cfg, seed=0, device="cpu")


def test_validation_keeps_the_best_checkpoint_like_plain_training():
    cfg = MetaTrainConfig(outer_steps=12, support_size=4, query_size=4, inner_lr=0.05, outer_lr=0.02,
                          rerank_every=4)
    tasks = toy_tasks()
    validation = tasks[0].data  # any held-out-like set; the squares task's data
    model = toy_model()
    result = meta_train(model, tasks, cfg, seed=0, device="cpu", validation=validation)
    assert result.best_step in (4, 8, 12)
    assert result.best_val_dice == pytest.approx(validation_dice(model, validation, torch.device("cpu"), 4))
    assert meta_train(toy_model(), tasks, cfg, seed=0, device="cpu").best_step is None
