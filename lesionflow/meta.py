"""MAML-style meta-training over good and bad task data (MISSION section 3).

A *task* is one training dataset (a lesion type, a source, ...). One outer step picks a task,
adapts a copy of the weights to a **support** batch from its primary pool (inner loop, plain SGD
on a dict of tensors through ``torch.func.functional_call`` — the module is never copied), then
takes the **query** loss of a batch from a secondary pool at those temporary weights and applies
its gradient to the original weights with Adam (outer loop). Every batch mixes good task data
(ground truth, or pseudo-labels whose quality score passed) with a ``bad_fraction`` of bad task
data, so the meta-learner sees noisy labels the way it will at deployment.

``order="first"`` (default) uses the query gradient at the temporary weights as the gradient of
the original ones (first-order MAML: no second derivatives, about the cost of plain training at
the same total batch). ``order="second"`` differentiates through the inner update.

    >>> import numpy as np, torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(4, 1, 1))
    >>> opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    >>> x = torch.rand(4, 1, 16, 16); y = (x > 0.5).float(); w = torch.ones(4)
    >>> losses = meta_step(net, opt, Batch(x[:2], y[:2], w[:2]), Batch(x[2:], y[2:], w[2:]),
    ...                    inner_lr=0.01)
    >>> sorted(losses)
    ['inner_loss', 'outer_loss']
    >>> order_tasks({"round": 0.9, "elongated": 0.4}, "ascending", np.random.default_rng(0))
    ['elongated', 'round']

With data: ``Task.split("round", dataset, good_idx, bad_idx, kinds=kinds)`` per task, then
``meta_train(segmenter, tasks, params.meta_train, seed=params.seed)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from lesionflow import distributed
from lesionflow.config import MetaTrainConfig
from lesionflow.errors import ConfigError
from lesionflow.loop import TrainingLoop
from lesionflow.losses import dice_bce_loss
from lesionflow.training import SegmentationDataset, pick_device, validation_dice

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Weights = dict[str, torch.Tensor]


def default_loss(logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dice_bce_loss`` (0.5 Dice + 0.5 BCE) averaged with per-sample weights."""
    return dice_bce_loss(logits, mask, sample_weight=weight)


class Batch(NamedTuple):
    image: torch.Tensor  # (B, C, S, S), uint8-scaled float, as ``Segmenter.forward`` expects
    mask: torch.Tensor  # (B, 1, S, S) in {0, 1}
    weight: torch.Tensor  # (B,)


def sample_weights(kinds: Sequence[str], correction_weight: float) -> np.ndarray:
    """Per-sample loss weights: reviewer corrections weigh ``correction_weight``, the rest 1
    (seed 002: a corrected mask is the most trustworthy label there is)."""
    return np.asarray([correction_weight if k == "correction" else 1.0 for k in kinds], np.float32)


@dataclass(frozen=True)
class Pool:
    """Indices into a task's dataset, split by label quality."""

    good: Sequence[int]
    bad: Sequence[int]

    def __len__(self) -> int:
        return len(self.good) + len(self.bad)


@dataclass
class Task:
    """One training dataset. ``primary`` feeds support batches, ``secondary`` query batches; they
    are disjoint so the query measures generalisation of the adapted weights. ``evaluation``
    ranks the task for the curriculum. ``kinds`` (aligned with ``data``) sets correction weights;
    ``None`` means no corrections. ``data``'s own ``weights`` are not used."""

    name: str
    data: SegmentationDataset
    primary: Pool
    secondary: Pool
    evaluation: Sequence[int]
    kinds: Sequence[str] | None = None

    def __post_init__(self) -> None:
        for label, pool in (("primary", self.primary), ("secondary", self.secondary),
                            ("evaluation", self.evaluation)):
            if not len(pool):
                raise ValueError(f"task {self.name!r}: the {label} pool is empty")
        if self.kinds is not None and len(self.kinds) != len(self.data):
            raise ValueError(f"task {self.name!r}: {len(self.kinds)} kinds for {len(self.data)} samples")

    @classmethod
    def split(cls, name: str, data: SegmentationDataset, good: Sequence[int], bad: Sequence[int], *,
              kinds: Sequence[str] | None = None, evaluation: Sequence[int] | None = None,
              query_share: float = 0.5, seed: int = 0) -> Task:
        """Shuffle good and bad indices and cut each into primary / secondary parts, so both pools
        keep the task's good/bad mix. ``evaluation`` defaults to all good indices (the labels
        worth scoring against)."""
        rng = np.random.default_rng(seed)

        def cut(idx: Sequence[int]) -> tuple[list[int], list[int]]:
            idx = rng.permutation(np.asarray(idx, dtype=int)).tolist()
            n_query = round(len(idx) * query_share)
            if len(idx) > 1:
                n_query = min(max(n_query, 1), len(idx) - 1)
            return idx[n_query:], idx[:n_query]

        (g1, g2), (b1, b2) = cut(good), cut(bad)
        return cls(name, data, Pool(g1, b1), Pool(g2, b2),
                   list(good) if evaluation is None else list(evaluation), kinds)

    def batch(self, indices: Sequence[int], correction_weight: float, device: torch.device) -> Batch:
        """Stack samples (the dataset's augmentation applies) with their correction weights."""
        images, masks, _ = zip(*(self.data[i] for i in indices))
        kinds = ["still"] * len(indices) if self.kinds is None else [self.kinds[i] for i in indices]
        weight = torch.from_numpy(sample_weights(kinds, correction_weight))
        return Batch(torch.stack(images).to(device), torch.stack(masks).to(device), weight.to(device))


def draw(pool: Pool, size: int, bad_fraction: float,
         rng: np.random.Generator) -> tuple[list[int], int, int]:
    """``size`` indices, ``round(bad_fraction * size)`` of them bad; an empty side is filled from
    the other. Without replacement unless a side holds fewer samples than asked.
    Returns (indices, n_good, n_bad)."""
    n_bad = round(bad_fraction * size) if pool.bad else 0
    if not pool.good:
        n_bad = size
    n_good = size - n_bad

    def pick(idx: Sequence[int], k: int) -> list[int]:
        return rng.choice(np.asarray(idx, dtype=int), k, replace=len(idx) < k).tolist() if k else []

    return pick(pool.good, n_good) + pick(pool.bad, n_bad), n_good, n_bad


def _loss(model: nn.Module, weights: Weights, buffers: Weights, batch: Batch,
          loss_fn: LossFn) -> torch.Tensor:
    return loss_fn(functional_call(model, (weights, buffers), (batch.image,)), batch.mask, batch.weight)


def inner_adapt(model: nn.Module, params: Weights, buffers: Weights, scratch: Weights, batch: Batch,
                *, inner_lr: float, inner_steps: int, loss_fn: LossFn,
                create_graph: bool) -> tuple[Weights, float]:
    """``inner_steps`` SGD steps from ``params`` on ``batch`` → (temporary weights, first loss).

    BatchNorm (if in train mode) normalises with batch statistics throughout. Only the first
    forward — at the original weights, as in plain training — writes the running statistics, into
    ``buffers`` (the module's own); later forwards run at temporary weights whose activations the
    saved model never produces, so they write into ``scratch``, a throwaway copy.
    With ``create_graph=False`` the temporary weights are fresh leaves (first-order: no graph back
    to ``params``); with ``True`` they stay differentiable functions of ``params``.
    In a process group each rank holds part of the support batch, and the inner gradients are
    averaged over the ranks (first-order only), so every rank adapts to the same weights.
    """
    fast, first = params, None
    for step in range(inner_steps):
        loss = _loss(model, fast, buffers if step == 0 else scratch, batch, loss_fn)
        # unused weights (a ResUNet's deep-supervision heads: the loss reads the final logits)
        # get zero gradients rather than an error
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph, materialize_grads=True)
        if create_graph:
            fast = {k: w - inner_lr * g for (k, w), g in zip(fast.items(), grads)}
        else:
            fast = {k: (w.detach() - inner_lr * g).requires_grad_()
                    for (k, w), g in zip(fast.items(), distributed.average(grads))}
        first = loss.item() if first is None else first
    return fast, first


def meta_step(model: nn.Module, optimizer: torch.optim.Optimizer, support: Batch, query: Batch, *,
              inner_lr: float, inner_steps: int = 1, order: str = "first",
              loss_fn: LossFn = default_loss) -> dict[str, float]:
    """One outer step: adapt on ``support``, then step ``optimizer`` on the query loss at the
    adapted weights. First-order: the query gradient w.r.t. the temporary weights is written into
    the original weights' (zeroed) ``.grad``. Second-order: the query loss is back-propagated
    through the inner update to the original weights. Trains whatever mode ``model`` is in."""
    if order not in ("first", "second"):
        raise ValueError(f"order must be 'first' or 'second', got {order!r}")
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    scratch = {k: b.clone() for k, b in buffers.items()}
    second = order == "second"
    fast, inner_loss = inner_adapt(model, params, buffers, scratch, support, inner_lr=inner_lr,
                                   inner_steps=inner_steps, loss_fn=loss_fn, create_graph=second)
    outer = _loss(model, fast, scratch, query, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    if second:
        outer.backward()
    else:
        for p, g in zip(params.values(), torch.autograd.grad(outer, list(fast.values()),
                                                                  materialize_grads=True)):
            p.grad = g
    optimizer.step()
    return {"inner_loss": inner_loss, "outer_loss": outer.item()}


def order_tasks(scores: dict[str, float], mode: str, rng: np.random.Generator) -> list[str]:
    """Task order for the next pass. ``ascending``: by score ascending — the task the model does
    **worst** on comes first (ties by name). ``random``: a permutation drawn from ``rng`` (the
    scores' values are ignored)."""
    names = sorted(scores)
    if mode == "ascending":
        return sorted(names, key=lambda n: (scores[n], n))
    if mode == "random":
        return [names[i] for i in rng.permutation(len(names))]
    raise ValueError(f"task order must be 'ascending' or 'random', got {mode!r}")


def score_tasks(model: nn.Module, tasks: Sequence[Task], device: torch.device,
                batch_size: int = 8) -> dict[str, float]:
    """Mean hard Dice per task on its evaluation pool, unaugmented. Leaves ``model`` in eval mode."""
    scores = {}
    for task in tasks:
        idx = np.asarray(task.evaluation, dtype=int)
        view = TensorDataset(torch.from_numpy(task.data.images[idx]).float(),
                             torch.from_numpy(task.data.masks[idx]).float(), torch.ones(len(idx)))
        scores[task.name] = validation_dice(model, view, device, batch_size)
    return scores


@dataclass
class MetaResult:
    history: list[dict] = field(default_factory=list)  # one row per outer step
    orders: list[dict] = field(default_factory=list)  # {"step", "order", "scores"} per new order
    scores: dict[str, float] = field(default_factory=dict)  # final per-task mean Dice
    seconds: float = 0.0
    best_step: int | None = None  # outer step whose weights were kept (with ``validation``)
    best_val_dice: float | None = None


def meta_train(model: nn.Module, tasks: Sequence[Task], cfg: MetaTrainConfig, *, seed: int,
               device: str | torch.device = "auto", loss_fn: LossFn = default_loss,
               on_step: Callable[[dict], None] | None = None,
               validation: SegmentationDataset | None = None) -> MetaResult:
    """Run ``cfg.outer_steps`` outer steps, one task each, walking the task order in passes.

    Every ``cfg.rerank_every`` steps all tasks are scored and a new pass starts from a fresh order
    (``ascending``: worst task first; ``random``: reshuffled). A pass that runs out before the
    next re-rank repeats (``ascending``, same scores) or reshuffles (``random``). The query batch
    comes from the task's own secondary pool (``query_from: same_task``) or from the secondary
    pool of the next task in the current order (``other_task``). ``cfg.enabled``, ``task_by`` and
    ``per_lesion_type`` are for the caller, which builds the tasks. The outer learning rate follows
    a one-cycle schedule, as plain training's does. With ``validation``, the model is scored on it
    at every re-rank and at the end, and the best weights are kept (plain training's model
    selection, so the two are compared on equal terms). Returns the model on CPU, in eval mode.

    In a process group (first-order only) every rank draws the same ``W·support_size`` support and
    ``W·query_size`` query indices and trains on its every-W-th part: the loop and ``inner_adapt``
    average the gradients, so W ranks take the outer steps one process takes with W-times the
    batches. Task order follows rank 0's scores; only rank 0 calls ``on_step``."""
    if not tasks:
        raise ValueError("meta-training needs at least one task")
    if cfg.query_from == "other_task" and len(tasks) < 2:
        raise ValueError("query_from: other_task needs at least two tasks")
    by_name = {t.name: t for t in tasks}
    if len(by_name) != len(tasks):
        raise ValueError("task names must be unique")
    world = distributed.world_size()
    if world > 1 and cfg.order != "first":
        raise ConfigError("distributed meta-training averages first-order gradients: set "
                          "meta_train.order: first, or train in one process")
    device = pick_device(device) if isinstance(device, str) else device
    torch.manual_seed(seed)
    order_rng, sample_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    model.to(device)
    if world > 1:  # ranks draw the same indices: their own augmentation keeps them apart
        for task in tasks:
            task.data.augmenter.reseed(distributed.rank_seed(seed))
    loop = TrainingLoop(model, lr=cfg.outer_lr, total_steps=cfg.outer_steps)
    result, queue, order, scores = MetaResult(), [], [], {}

    def keep_if_best(step: int) -> None:
        if validation is not None:
            loop.select(step, validation_dice(model, validation, device, cfg.query_size))

    for step in range(cfg.outer_steps):
        rerank = step % cfg.rerank_every == 0
        if rerank:
            if step:
                keep_if_best(step)
            scores = distributed.from_main(score_tasks(model, tasks, device, cfg.query_size))
        if rerank or not queue:
            if rerank or cfg.task_order == "random":
                order = order_tasks(scores, cfg.task_order, order_rng)
                result.orders.append({"step": step, "order": order, "scores": dict(scores)})
            queue = list(order)
        task = by_name[queue.pop(0)]
        query_task = task
        if cfg.query_from == "other_task":
            query_task = by_name[order[(order.index(task.name) + 1) % len(order)]]
        s_idx, s_good, s_bad = draw(task.primary, cfg.support_size * world, cfg.bad_fraction, sample_rng)
        q_idx, q_good, q_bad = draw(query_task.secondary, cfg.query_size * world, cfg.bad_fraction,
                                    sample_rng)
        model.train()
        losses = meta_step(model, loop.optimizer,
                           task.batch(distributed.shard(s_idx), cfg.correction_weight, device),
                           query_task.batch(distributed.shard(q_idx), cfg.correction_weight, device),
                           inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, order=cfg.order,
                           loss_fn=loss_fn)
        losses = distributed.mean_over_ranks(losses)
        loop.after_step()
        row = {"step": step, "task": task.name, "query_task": query_task.name, **losses,
               "support_good": s_good, "support_bad": s_bad, "query_good": q_good,
               "query_bad": q_bad, "seconds": loop.seconds}
        result.history.append(row)
        if on_step and distributed.is_main():
            on_step(row)
    keep_if_best(cfg.outer_steps)
    result.best_step, result.best_val_dice = loop.best_at, loop.best_score
    loop.finish().to(device)
    result.scores = score_tasks(model, tasks, device, cfg.query_size)
    result.seconds = loop.seconds
    model.to("cpu").eval()
    return result
