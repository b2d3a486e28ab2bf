"""The training loop every trainer shares: plain (``training.fit``), weak (``weak.train.fit_weak``)
and meta (``meta.meta_train``).

Each trainer owns what differs — how a batch becomes a loss, when to re-rank tasks or re-annotate
superpixels — and hands the rest to one ``TrainingLoop``: the optimizer and its one-cycle LR
schedule, the moving average of the weights (EMA), model selection on validation, the
wall-time budget, and how the forward pass runs (memory layout, bf16 autocast). So the three are
compared on equal terms, and a better loop helps all three.

In a process group (``lesionflow.distributed``, under torchrun) the loop is also where the ranks
meet: they start from rank 0's weights, every optimizer step uses the gradients averaged over the
ranks, buffers follow rank 0's, and rank 0 decides selection and the budget — so every rank holds
the same model throughout, and the trainers only shard their data.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lesionflow import distributed

WARMUP = 0.15  # share of the one-cycle schedule spent raising the learning rate


class TrainingLoop:
    """AdamW + one-cycle over ``total_steps``; ``shipped`` is what validates and ships (the EMA of
    the weights when ``ema_decay`` is set, else the model itself)."""

    def __init__(self, model: nn.Module, *, lr: float, total_steps: int, weight_decay: float = 0.0,
                 ema_decay: float | None = None, max_minutes: float | None = None, precision: str = "fp32"):
        self.model, self.max_minutes = model, max_minutes
        device = next(model.parameters()).device
        self.autocast_dtype = torch.bfloat16 if uses_bf16(precision, device) else None
        self.device_type = device.type
        # NHWC: oneDNN's convolutions (and cuDNN's bf16 ones) run faster on it, 1.2x training
        # images/s measured on CPU; a convolution follows its weights' layout, so inputs need not move
        model.to(memory_format=torch.channels_last)
        distributed.broadcast_([*model.parameters(), *model.buffers()])
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=lr, total_steps=max(total_steps, 1), pct_start=WARMUP)
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

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Where the trainer computes its loss: bf16 autocast when ``precision`` asked for it."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

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

    def epochs_in_budget(self, epochs_done: int, epochs: int) -> int:
        """How many epochs to run in all: ``epochs``, or — when at the pace so far (training and
        validation) the rest would pass ``max_minutes`` — the most that end within it, with the
        one-cycle schedule shortened to end with them. Why: a budget that cuts a schedule mid-way
        ships weights trained at a high learning rate; on a slower machine the same config should
        still finish annealed, just with fewer epochs."""
        if not self.max_minutes or not epochs_done or epochs_done >= epochs:
            return epochs
        left = self.max_minutes * 60 - self.seconds
        fits = distributed.from_main(epochs_done + max(0, int(left // (self.seconds / epochs_done))))
        if fits >= epochs:
            return epochs
        steps_per_epoch = self.scheduler.last_epoch // epochs_done
        self._end_schedule_at(max(fits * steps_per_epoch, self.scheduler.last_epoch))
        return fits

    def _end_schedule_at(self, total_steps: int) -> None:
        """Shorten the one-cycle schedule to ``total_steps``, keeping the steps already taken: a
        warm-up still under way ends at its share of the new length (or now), the annealing
        phase ends with the last step. (``OneCycleLR`` keeps its phases' ends in
        ``_schedule_phases``; ``tests/test_models.py`` holds the result to a full anneal.)"""
        scheduler, done = self.scheduler, self.scheduler.last_epoch
        warmup, anneal = scheduler._schedule_phases
        if done <= warmup["end_step"]:
            warmup["end_step"] = max(float(done), WARMUP * total_steps - 1)
        anneal["end_step"] = total_steps - 1
        scheduler.total_steps = total_steps

    @property
    def precision(self) -> str:
        """What the forward pass runs in: "bf16" (autocast) or "fp32"."""
        return "fp32" if self.autocast_dtype is None else "bf16"

    def out_of_time(self) -> bool:
        return distributed.from_main(bool(self.max_minutes) and self.seconds > self.max_minutes * 60)

    def finish(self) -> nn.Module:
        """The model with the selected weights (else ``shipped``'s last ones), on CPU, eval mode."""
        state = self._best_state if self._best_state is not None else self.shipped.state_dict()
        self.model.load_state_dict(state)
        return self.model.to("cpu", memory_format=torch.contiguous_format).eval()


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``train.precision`` means bf16 autocast on ``device`` ("auto": where it has bf16
    units; emulated bf16 is slower than fp32)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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
