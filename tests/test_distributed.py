"""Data-parallel training (lesionflow.distributed) with real ``torchrun`` processes on gloo/CPU.

The claim: W ranks with batch b take the same optimizer steps as one process with batch W·b.
It is exact only where no sample's loss depends on another's, and torch 2.13's ``SyncBatchNorm``
refuses CPU tensors — so the equivalence tests train a small net **without batch norm**
(``PlainNet``), where the only difference is the order of float additions: weights agree to
``ATOL`` (float32, a few Adam steps at lr 1e-2; observed differences ≤ 5e-8). The real models
(batch norm, per-rank statistics as in DDP) run through the worker test.

This file is also the script torchrun starts: ``python test_distributed.py SCENARIO DATASET OUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # conftest's free_port, also when torchrun runs this file
from conftest import free_port  # noqa: E402

ATOL = 1e-6
PER_RANK = 2  # batch per rank; one process takes 2 × PER_RANK
N_TRAIN = 8  # divisible by 2 × PER_RANK: no padded or dropped samples


def torchrun(nproc: int, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
             ) -> subprocess.Popen:
    """``args`` under ``torchrun --nproc_per_node=nproc`` (the venv's torch, a free rendezvous
    port, one thread per rank as the workers of a 2-core machine must), started."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1]), **(env or {})}
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, timeout: float = 240) -> str:
    """``proc``'s stdout once it has exited 0 (killed after ``timeout`` s)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{out[-3000:]}\n{err[-5000:]}"
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A canonical synthetic dataset: 12 labelled 32² stills of two lesion types."""
    from lesionflow import config
    from lesionflow.steps.ingest import build_dataset

    root = tmp_path_factory.mktemp("ddp")
    params = config.load(None, ["ingest.source=synthetic", "synthetic.n_images=12", "synthetic.n_videos=0",
                                "synthetic.n_weak=0", "synthetic.size=32", f"runtime.workdir={root / 'work'}"])
    build_dataset(params, root / "dataset")
    return root / "dataset"


# --- what the torchrun processes run -------------------------------------------------------------

class PlainNet(nn.Sequential):
    """Two convolutions, no batch norm: each sample's loss depends on that sample alone."""

    multiple = 1
    hparams = {"in_channels": 3}

    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 1, 3, padding=1))


def _segmenter():
    from lesionflow.models.segmenter import Segmenter

    torch.manual_seed(0)
    return Segmenter(PlainNet(), 32, [120.0] * 3, [60.0] * 3)


def _records(dataset: Path):
    from lesionflow.data.manifest import read_manifest

    return sorted((r for r in read_manifest(dataset) if r.mask is not None), key=lambda r: r.id)


def _plain(dataset: Path, out: Path, batch: int) -> None:
    """Three epochs of ``fit``; rank 0 saves the weights after each (the model, not the EMA)."""
    from lesionflow import distributed
    from lesionflow.config import TrainConfig
    from lesionflow.training import SegmentationDataset, fit

    model = _segmenter()
    records = _records(dataset)[:N_TRAIN]
    train = SegmentationDataset(dataset, records, model)
    cfg = TrainConfig(image_size=32, batch_size=batch, epochs=3, lr=1e-2, augment="none", device="cpu")
    states = []
    fit(model, train, train, cfg, seed=3,
        on_epoch=lambda row: states.append({k: v.clone() for k, v in model.state_dict().items()}))
    if distributed.is_main():
        torch.save(states, out)


def _meta(dataset: Path, out: Path, batch: int) -> None:
    """Six first-order MAML outer steps over two tasks (support and query ``batch`` per rank)."""
    from lesionflow import distributed
    from lesionflow.config import MetaTrainConfig
    from lesionflow.meta import Task, meta_train
    from lesionflow.training import SegmentationDataset

    model = _segmenter()
    records = _records(dataset)
    data = SegmentationDataset(dataset, records, model)
    tasks = [Task.split(name, data, [i for i, r in enumerate(records) if r.lesion_type == name], [], seed=1)
             for name in sorted({r.lesion_type for r in records})]
    cfg = MetaTrainConfig(enabled=True, outer_steps=6, support_size=batch, query_size=batch, inner_lr=0.05,
                          outer_lr=1e-2, rerank_every=3, task_order="ascending", bad_fraction=0.0)
    steps = []
    result = meta_train(model, tasks, cfg, seed=5, device="cpu", on_step=steps.append)
    if distributed.is_main():
        torch.save({"state": model.state_dict(), "steps": steps, "orders": result.orders}, out)


def _script(dataset: str, out: str) -> None:
    """Both scenarios in one launch (starting torch is most of a launch's cost)."""
    from lesionflow import distributed

    with distributed.process_group(torch.device("cpu")):
        batch = PER_RANK * (2 if distributed.world_size() == 1 else 1)
        _plain(Path(dataset), Path(out) / "plain.pt", batch)
        _meta(Path(dataset), Path(out) / "meta.pt", batch)


# --- the tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> dict[int, Path]:
    """{ranks: folder with plain.pt and meta.pt}: 2 ranks × batch 2 and 1 rank × batch 4, run
    side by side."""
    outs = {n: tmp_path_factory.mktemp(f"ranks{n}") for n in (1, 2)}
    procs = [torchrun(n, str(HERE), str(dataset), str(out)) for n, out in outs.items()]
    for proc in procs:
        finished(proc)
    return outs


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_ranks_of_batch_b_train_like_one_of_batch_2b(trained):
    """Plain ``fit``: 2 ranks × batch 2 (``DistributedSampler`` halves, averaged gradients) and
    1 rank × batch 4 hold the same weights after each of three epochs, within ``ATOL``."""
    two, one = (torch.load(trained[n] / "plain.pt") for n in (2, 1))
    assert len(two) == len(one) == 3
    start = _segmenter().state_dict()
    for epoch in range(3):
        assert _close(two[epoch], start) > 100 * ATOL  # they trained: equal weights mean something
        assert _close(two[epoch], one[epoch]) < ATOL, f"epoch {epoch}"


def test_first_order_maml_outer_step_is_data_parallel(trained):
    """``meta_train``: 2 ranks with support/query 2 (each every other index of one shared draw,
    inner and outer gradients averaged) and 1 rank with support/query 4 end six outer steps with
    the same weights, the same task order, and the same (rank-averaged) losses."""
    two, one = (torch.load(trained[n] / "meta.pt") for n in (2, 1))
    assert _close(two["state"], _segmenter().state_dict()) > 100 * ATOL
    assert _close(two["state"], one["state"]) < ATOL
    assert [o["order"] for o in two["orders"]] == [o["order"] for o in one["orders"]]
    assert len(two["steps"]) == len(one["steps"]) == 6  # rank 0 alone reported each step
    for a, b in zip(two["steps"], one["steps"]):
        assert (a["task"], a["support_good"], a["query_good"]) == (b["task"], 2 * PER_RANK, 2 * PER_RANK)
        assert a["outer_loss"] == pytest.approx(b["outer_loss"], abs=1e-5)
        assert a["inner_loss"] == pytest.approx(b["inner_loss"], abs=1e-5)


class Stream(IterableDataset):
    """A set's samples in order, as a stream with a length (what ``data.shards`` gives ``fit``)."""

    def __init__(self, data):
        self.data, self.yielded = data, 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        for i in range(len(self.data)):
            self.yielded += 1
            yield self.data[i]


def test_fit_takes_an_iterable_train_set_for_the_steps_its_length_gives(dataset):
    """No sampler or shuffle for a stream (the DataLoader would refuse them), and the one-cycle
    schedule spans the steps ``len`` gives: the same learning rates as the in-memory set's run."""
    from lesionflow.config import TrainConfig
    from lesionflow.training import SegmentationDataset, fit

    model = _segmenter()
    data = SegmentationDataset(dataset, _records(dataset)[:N_TRAIN], model)
    cfg = TrainConfig(image_size=32, batch_size=3, epochs=2, lr=1e-2, augment="none", device="cpu")
    stream = Stream(data)
    streamed = fit(model, stream, data, cfg, seed=0)
    in_memory = fit(_segmenter(), data, data, cfg, seed=0)
    assert stream.yielded == 2 * N_TRAIN
    assert [r["lr"] for r in streamed.history] == [r["lr"] for r in in_memory.history]
    assert _close(model.state_dict(), _segmenter().state_dict()) > 100 * ATOL


def test_worker_writes_the_model_and_result_from_rank_zero_only(dataset, tmp_path):
    """``python -m lesionflow.distributed`` on 2 ranks trains the step's model (a real UNet, batch
    norm included) and only rank 0 writes: one model dir, one result.json; no rank leaves an
    MLflow store (or anything else) in the working directory."""
    from lesionflow import UNCONNECTED_TRACKING_URI
    from lesionflow.models.store import load_model

    params = tmp_path / "params.yaml"
    params.write_text("train: {image_size: 32, batch_size: 2, epochs: 2, device: cpu}\n"
                      "model: {base_channels: 4, depth: 2}\n"
                      "meta_train: {enabled: false}\n")
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "out"
    cmd = ["-m", "lesionflow.distributed", "--params", str(params), "--dataset", str(dataset), "--out", str(out)]
    # a run named by the environment, but no store: nothing to resume, the log is thrown away
    env = {"MLFLOW_TRACKING_URI": UNCONNECTED_TRACKING_URI, "MLFLOW_RUN_ID": "0" * 32}
    stdout = finished(torchrun(2, *cmd, cwd=work, env=env))
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["training"] == "plain"
    assert 0 <= result["metrics"]["best_val_dice"] <= 1 and "train_loss" in result["metrics"]
    assert stdout.count('"world_size": 2') == 1  # rank 0 alone printed its result
    assert sorted(p.name for p in out.iterdir()) == sorted(["records.json", "result.json", "segmenter.pt"])
    assert list(work.iterdir()) == []
    model = load_model(out)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)


if __name__ == "__main__":
    _script(*sys.argv[1:])
