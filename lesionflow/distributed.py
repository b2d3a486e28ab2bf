"""Data-parallel training over processes (``torch.distributed``): ``torchrun`` here, Kubeflow
Trainer's ``torch-distributed`` runtime on a cluster.

The trainers barely know about it. ``TrainingLoop`` (loop.py) starts every rank from rank 0's
weights, averages each optimizer step's gradients over the ranks, keeps the buffers (batch-norm
statistics) equal to rank 0's, and takes rank 0's word on model selection and the wall budget;
``fit`` shards the train set with ``DistributedSampler``; ``meta_train`` splits each support and
query draw by rank and averages the inner gradients too. So W ranks with batch b take the steps
one process takes with batch W·b. Outside a process group every helper here is the identity, and
single-process training is what it was.

Why not the ``DistributedDataParallel`` wrapper: it reduces gradients only for a forward through
itself, and meta-training's forwards at temporary weights (``functional_call``) and deep
supervision's ``forward_all`` go around it. One flat all-reduce per step averages the same
gradients; DDP would overlap it with the backward pass, which buys little on CPU workers.

Batch norm: each rank normalises with its own batch's statistics (DDP's default). torch 2.13's
``SyncBatchNorm`` refuses CPU tensors ("expected input tensor to be on GPU"), so there is no
synchronised alternative on gloo; with batch norm, W×b matches 1×W·b only approximately.

Worker entry point (what a TrainJob pod runs; the meta_train step's training on a dataset dir)::

    torchrun --nproc_per_node=2 -m lesionflow.distributed --params params.yaml --dataset DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from lesionflow.errors import ConfigError

RESULT_FILE = "result.json"
T = TypeVar("T")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``): its GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0: the one process that logs to MLflow and writes the model."""
    return rank() == 0


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the process group torchrun's environment describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``PORT``) for the duration — NCCL for CUDA, gloo for CPU — and leave it.
    Without that environment (a plain ``python`` run) nothing is joined."""
    if "WORLD_SIZE" not in os.environ or initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())  # NCCL's own tensors (object broadcasts) go there
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_seed(seed: int) -> int:
    """Rank 0 keeps ``seed`` (one process draws what it always drew); rank r > 0 gets its own
    stream, so ranks do not repeat one another's augmentation."""
    r = rank()
    return seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def shard(items: Sequence[T]) -> list[T]:
    """This rank's part of ``items`` (every W-th from its rank): the W parts are ``items``."""
    return list(items[rank()::world_size()])


def average(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise mean of ``tensors`` over the ranks (one flat all-reduce); the tensors
    themselves with one rank."""
    world = world_size()
    if world == 1:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per-rank figures (a loss on the rank's part of the batch) averaged over the ranks: what
    one process with the whole batch reports."""
    if world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    (mean,) = average([torch.tensor(list(values.values()), dtype=torch.float64, device=device)])
    return dict(zip(values, mean.tolist()))


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each ``.grad`` by its mean over the ranks (before the optimizer step). Parameters
    without a gradient (outside this loss's graph) must be the same on every rank: the model and
    loss are."""
    params = [p for p in params if p.grad is not None]
    for p, mean in zip(params, average([p.grad for p in params])):
        p.grad.copy_(mean)


def broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's."""
    if world_size() > 1:
        for t in tensors:
            dist.broadcast(t.data, src=0)


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank: decisions (keep these weights? out of time? task order)
    must not differ between ranks, or their collectives stop matching and the job hangs."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_worker(params, dataset_dir: Path, out_dir: Path, train_shards=None) -> dict[str, Any]:
    """Train what the meta_train step trains (``steps.meta_train.run``: meta or plain, per
    ``meta_train.enabled``) on a canonical dataset dir, one rank of a torchrun job (or alone);
    plain training streams the train split from ``train_shards`` (a ``data.shards.ShardSource``)
    when given.

    Rank 0 writes the model (``models.store.save_model``) and the training records to
    ``out_dir``, plus ``result.json``: what was trained, the world size, wall seconds and the
    final MLflow metrics of the run. It logs to the MLflow store ``MLFLOW_TRACKING_URI`` names
    (into ``MLFLOW_RUN_ID``'s run if set: the launching step's); without one, to a throwaway
    store, whose metrics still reach ``result.json``. The other ranks write nothing: the step's
    outputs and logs go to a scratch directory that is deleted.
    """
    from lesionflow.steps import meta_train as step
    from lesionflow.training import pick_device

    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    with process_group(pick_device(params.train.device)):
        if params.train.init_from is not None and world_size() > 1:
            raise ConfigError("train.init_from with several workers: only rank 0 reaches the model "
                              "registry; set train.init_from: null for distributed training")
        with tempfile.TemporaryDirectory(prefix=f"lesionflow-rank{rank()}-") as scratch:
            target = out_dir if is_main() else Path(scratch) / "model"
            with _tracking(Path(scratch)) as run:
                start = time.monotonic()
                step.run(params, dataset_dir, target, train_shards)
                seconds = time.monotonic() - start
                metrics = _final_metrics(run.info.run_id)
        result = {"training": "meta" if params.meta_train.enabled else "plain",
                  "world_size": world_size(), "seconds": round(seconds, 3), "metrics": metrics}
        if is_main():
            (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
        return result


@contextmanager
def _tracking(scratch: Path):
    """An active MLflow run for the step's logging: rank 0's in the configured store, every
    other one (and rank 0's when no store is configured) in a local store under ``scratch``
    (MLflow's file store: no database to create for a log nobody reads; the run and experiment
    the environment names are the configured store's, not this one's)."""
    import mlflow

    from lesionflow import UNCONNECTED_TRACKING_URI

    configured = os.environ.get("MLFLOW_TRACKING_URI", UNCONNECTED_TRACKING_URI) != UNCONNECTED_TRACKING_URI
    if not (is_main() and configured):
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            os.environ.pop(name, None)
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        mlflow.set_tracking_uri((scratch / "mlruns").as_uri())
    with mlflow.start_run() as run:
        yield run


def _final_metrics(run_id: str) -> dict[str, float]:
    import mlflow

    return dict(sorted(mlflow.get_run(run_id).data.metrics.items())) if is_main() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lesionflow.distributed",
                                     description="one rank of data-parallel training (run under torchrun)")
    parser.add_argument("--params", action="append", required=True, type=Path,
                        help="params YAML; repeat to layer files, later ones win")
    parser.add_argument("--dataset", required=True, type=Path, help="canonical dataset directory")
    parser.add_argument("--out", required=True, type=Path, help="model directory (rank 0 writes it)")
    args = parser.parse_args(argv)
    from lesionflow import config
    from lesionflow.errors import LesionflowError

    try:
        result = run_worker(config.load(args.params), args.dataset, args.out)
    except LesionflowError as err:
        print(f"lesionflow.distributed: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:  # the group is gone: torchrun's word for the rank
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
