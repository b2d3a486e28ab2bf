"""The training loop every trainer shares: plain (``training.fit``), weak (``weak.train.fit_weak``)
and meta (``meta.meta_train``).

Each trainer owns what differs — how a batch becomes a loss, when to re-rank tasks or re-annotate
superpixels — and hands the rest to one ``TrainingLoop``: the optimizer and its one-cycle LR
schedule, the moving average of the weights (EMA), model selection on validation, and the
wall-time budget. So the three are compared on equal terms, and a better loop helps all three.

In a process group (``lesionflow.distributed``, under torchrun) the loop is also where the ranks
meet: they start from rank 0's weights, every optimizer step uses the gradients averaged over the
ranks, buffers follow rank 0's, and rank 0 decides selection and the budget — so every rank holds
the same model throughout, and the trainers only shard their data.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lesionflow import distributed


class TrainingLoop:
    """AdamW + one-cycle over ``total_steps``; ``shipped`` is what validates and ships (the EMA of
    the weights when ``ema_decay`` is set, else the model itself)."""

    def __init__(self, model: nn.Module, *, lr: float, total_steps: int, weight_decay: float = 0.0,
                 ema_decay: float | None = None, max_minutes: float | None = None):
        self.model, self.max_minutes = model, max_minutes
        distributed.broadcast_([*model.parameters(), *model.buffers()])
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=lr, total_steps=max(total_steps, 1), pct_start=0.15)
        if distributed.world_size() > 1:  # also for trainers that call optimizer.step themselves
            self.optimizer.register_step_pre_hook(
                lambda *_: distributed.average_gradients(self.model.parameters()))
        # use_buffers: batch-norm statistics are averaged too, so the EMA is a model of its own
        self.ema = (AveragedModel(model, multi_avg_fn=_ema_with_warmup(ema_decay), use_buffers=True)
                    if ema_decay else None)
        self.best_at: int | None = None
        self.best_score: float | None = None
        self._best_state: dict | None = None
        self._start = time.monotonic()

    @property
    def shipped(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._start

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, loss: torch.Tensor) -> float:
        """Back-propagate ``loss`` and take one optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.after_step()
        return loss.item()

    def after_step(self) -> None:
        """Advance the schedule and the average; for trainers that step ``optimizer`` themselves
        (meta-training writes the outer gradient by hand)."""
        distributed.broadcast_(self.model.buffers())  # per-rank batch-norm statistics → rank 0's
        self.scheduler.step()
        if self.ema:
            self.ema.update_parameters(self.model)

    def select(self, at: int, score: float) -> bool:
        """Keep ``shipped``'s weights if ``score`` (validation) is the best so far (rank 0's)."""
        score = distributed.from_main(score)
        if self.best_score is not None and score <= self.best_score:
            return False
        self.best_at, self.best_score = at, score
        self._best_state = copy.deepcopy(self.shipped.state_dict())
        return True

    def out_of_time(self) -> bool:
        return distributed.from_main(bool(self.max_minutes) and self.seconds > self.max_minutes * 60)

    def finish(self) -> nn.Module:
        """The model with the selected weights (else ``shipped``'s last ones), on CPU, eval mode."""
        state = self._best_state if self._best_state is not None else self.shipped.state_dict()
        self.model.load_state_dict(state)
        return self.model.to("cpu").eval()


def _ema_with_warmup(decay: float):
    """EMA update whose decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after n updates: with
    a fixed 0.995 the average would still be two thirds random initialisation after the first
    epoch of a thousand images, and the first validations would select nothing useful."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        for avg, cur in zip(averaged, current, strict=True):
            avg.lerp_(cur, weight) if avg.is_floating_point() else avg.copy_(cur)

    return update
