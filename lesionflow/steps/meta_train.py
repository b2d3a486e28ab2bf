"""Meta-train step: MAML over good/bad task data, one model or one per lesion type.

Tasks are the training records grouped by ``meta_train.task_by``; records whose pseudo-label
quality was judged ``bad`` form each task's bad pool, everything else (ground truth, good
pseudo-labels, corrections) its good pool. ``meta_train.enabled: false`` trains the plain
supervised baseline on the same data instead, so both arms of a comparison go through one step.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlflow

from lesionflow.config import Params
from lesionflow.data.manifest import Record, is_bad, read_manifest
from lesionflow.data.shards import ShardSource
from lesionflow.errors import ConfigError, EmptySplitError
from lesionflow.lineage import RECORDS_FILE
from lesionflow.losses import dice_bce_loss
from lesionflow.meta import MetaResult, Pool, Task, meta_train
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import ROUTER, save_model
from lesionflow.steps.train import new_segmenter, plain_train_records, train
from lesionflow.training import SegmentationDataset, labelled, seed_everything


@dataclass
class MetaTrainOutcome:
    results: dict[str, MetaResult]  # per trained model ("all", or one per lesion type)
    pools: dict[str, dict[str, int]]  # task → {"good": n, "bad": n}
    budget_epochs: int | None = None  # plain training: the epochs train.max_minutes cut it to
    precision: str | None = None  # plain training: bf16 | fp32 (meta-training runs in fp32)


def task_key(record: Record, task_by: str) -> str:
    return getattr(record, task_by)


def build_tasks(params: Params, dataset_dir: Path, records: list[Record],
                model: Segmenter) -> tuple[list[Task], dict[str, dict[str, int]]]:
    """One ``Task`` per ``task_by`` value over one in-memory dataset of the given train records.

    A task needs two records (one support, one query); smaller ones are merged into one task of
    their own, or into the smallest other task if that is still too small, so every record — a
    lone correction of a new lesion type included — reaches training. A lone record with nothing
    to merge into is its own support and query. Only model-made masks judged bad go to the bad
    pool: ground truth and corrections are always good task data."""
    data = SegmentationDataset(dataset_dir, records, model, augment=params.train.augment, seed=params.seed)
    kinds = [r.kind for r in records]
    members: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        members[task_key(record, params.meta_train.task_by)].append(i)
    members = merge_small_tasks(members)
    tasks, pools = [], {}
    for name in sorted(members):
        bad = [i for i in members[name] if is_bad(records[i])]
        good = [i for i in members[name] if not is_bad(records[i])]
        if len(members[name]) == 1:
            tasks.append(Task(name, data, Pool(good, bad), Pool(good, bad), good or bad, kinds))
        else:
            tasks.append(Task.split(name, data, good, bad, kinds=kinds, seed=params.seed))
        pools[name] = {"good": len(good), "bad": len(bad)}
    return tasks, pools


def merge_small_tasks(members: dict[str, list[int]], minimum: int = 2) -> dict[str, list[int]]:
    """Tasks with fewer than ``minimum`` records joined into one named ``a+b`` (said aloud), or
    into the smallest other task when even the joined one is too small."""
    small = sorted(name for name, idx in members.items() if len(idx) < minimum)
    if not small:
        return members
    merged = {name: idx for name, idx in members.items() if name not in small}
    pooled = [i for name in small for i in members[name]]
    if len(pooled) >= minimum or not merged:
        merged["+".join(small)] = pooled
        into = "+".join(small)
    else:
        into = min(merged, key=lambda n: (len(merged[n]), n))
        merged[into] = merged[into] + pooled
    print(f"task(s) {small} have fewer than {minimum} records: trained as part of task {into!r}")
    return merged


def _train_one(params: Params, dataset_dir: Path, records: list[Record], val_records: list[Record],
               prefix: str, lesion_type: str | None = None
               ) -> tuple[Segmenter, MetaResult, dict[str, dict[str, int]]]:
    model = new_segmenter(params, dataset_dir, lesion_type)
    tasks, pools = build_tasks(params, dataset_dir, records, model)
    if params.meta_train.query_from == "other_task" and len(tasks) < 2:
        raise ConfigError(f"meta_train.query_from: other_task needs two tasks, but the train records"
                          f"{' of ' + lesion_type if lesion_type else ''} form one "
                          f"({', '.join(pools)}; meta_train.task_by: {params.meta_train.task_by}): "
                          "set meta_train.query_from: same_task, or task_by: group")
    validation = SegmentationDataset(dataset_dir, val_records, model) if val_records else None
    cfg = params.train

    def loss_fn(logits, mask, weight):
        return dice_bce_loss(logits, mask, dice_weight=cfg.dice_weight, bce_weight=cfg.bce_weight,
                             sample_weight=weight)

    def log_step(row: dict) -> None:
        mlflow.log_metrics({f"{prefix}inner_loss": row["inner_loss"],
                            f"{prefix}outer_loss": row["outer_loss"]}, step=row["step"])

    result = meta_train(model, tasks, params.meta_train, seed=params.seed, device=cfg.device,
                        loss_fn=loss_fn, on_step=log_step, validation=validation)
    if result.best_val_dice is not None:
        mlflow.log_metrics({f"{prefix}best_val_dice": result.best_val_dice,
                            f"{prefix}best_step": result.best_step})
    return model, result, pools


def write_training_records(out_dir: Path, records: list[Record]) -> None:
    """What the model trained and selected on (ids + content), next to its weights: registration
    stores it, and the gate never scores a model on records it has seen."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"id": r.id, "split": r.split, "kind": r.kind, "image_sha256": r.image_sha256,
             "mask_sha256": r.mask_sha256, "labelled_by": r.labelled_by} for r in records]
    (out_dir / RECORDS_FILE).write_text(json.dumps(rows, indent=0, sort_keys=True))


def run(params: Params, dataset_dir: Path, out_dir: Path,
        train_shards: ShardSource | None = None) -> MetaTrainOutcome:
    """``train_shards``: plain training streams the train split from them (``steps.train.train``);
    meta-training draws task pools by index, so its caller must not pass them."""
    mcfg = params.meta_train
    mlflow.log_params({f"meta_train.{k}": v for k, v in mcfg.model_dump().items()})
    seed_everything(params.seed, params.train.deterministic)
    manifest = read_manifest(dataset_dir)
    # meta-training feeds bad pseudo-labels to its bad pools; plain training drops them by default
    records = labelled(manifest, "train") if mcfg.enabled else plain_train_records(params, manifest)
    val_records = labelled(manifest, "val")
    if not records:
        raise EmptySplitError("the train split has no labelled records to train on (pseudo-labels "
                              "judged bad do not count unless train.bad_pseudo_labels: keep): give "
                              "ingest.split.train a share > 0 (or more groups), or add labelled images")
    write_training_records(out_dir, records + val_records)
    if params.cluster.train.num_nodes > 1:
        return train_on_cluster(params, dataset_dir, out_dir)
    if not mcfg.enabled:
        fitted = train(params, dataset_dir, out_dir, train_shards)
        cut = fitted.epochs_run < params.train.epochs
        return MetaTrainOutcome({}, {}, budget_epochs=fitted.epochs_run if cut else None,
                                precision=fitted.precision)
    mlflow.log_params({f"model.{k}": v for k, v in params.model.model_dump().items()})
    mlflow.log_metrics({"n_good": sum(not is_bad(r) for r in records),
                        "n_bad": sum(is_bad(r) for r in records),
                        "n_corrections": sum(r.kind == "correction" for r in records)})
    if mcfg.per_lesion_type:
        by_type: dict[str, list[Record]] = defaultdict(list)
        for r in records:
            by_type[r.lesion_type].append(r)
        models, results, pools = {}, {}, {}
        for lesion_type in sorted(by_type):
            model, result, type_pools = _train_one(
                params, dataset_dir, by_type[lesion_type],
                [r for r in val_records if r.lesion_type == lesion_type], prefix=f"{lesion_type}.",
                lesion_type=lesion_type)
            models[lesion_type], results[lesion_type] = model, result
            pools.update({f"{lesion_type}/{k}": v for k, v in type_pools.items()})
        save_model(LesionTypeRouter(models), out_dir)
    else:
        model, result, pools = _train_one(params, dataset_dir, records, val_records, prefix="")
        results = {"all": result}
        save_model(model, out_dir)
    for name, result in results.items():
        mlflow.log_dict({"orders": result.orders, "final_task_scores": result.scores,
                         "step_counts": dict(Counter(row["task"] for row in result.history))},
                        f"meta/{name}_task_order.json")
    mlflow.log_dict(pools, "meta/good_bad_pools.json")
    return MetaTrainOutcome(results, pools)


def train_on_cluster(params: Params, dataset_dir: Path, out_dir: Path) -> MetaTrainOutcome:
    """The same training on ``cluster.train.num_nodes`` nodes as a Kubeflow Trainer TrainJob
    (``lesionflow.trainjob``), its model collected into ``out_dir`` as if trained here. The pods
    restore the dataset from the DVC remote: versioning it again is content-addressed, so it hashes
    but uploads nothing the pseudo_label step already pushed. Their rank 0 logs into a child run of
    this step's run (named ``trainjob``)."""
    import lesionflow
    from lesionflow import trainjob
    from lesionflow.distributed import RESULT_FILE
    from lesionflow.versioning import version_dataset

    if params.train.init_from is not None:
        raise ConfigError(f"train.init_from: {params.train.init_from} with cluster.train.num_nodes > 1: "
                          "the training pods do not load registered weights; set train.init_from: null "
                          "(no --warm-start) or cluster.train.num_nodes: 1")
    runtime = params.runtime
    version = version_dataset(dataset_dir, remote=runtime.remote(), endpoint_url=runtime.s3_endpoint_url,
                              workspace=runtime.resolved_workdir() / "dvc-workspace",
                              retry_seconds=runtime.service_wait_seconds)
    with mlflow.start_run(run_name="trainjob", nested=True) as child:
        ref = trainjob.run(params, version.md5, out_dir, image=lesionflow.IMAGE,
                           mlflow_run_id=child.info.run_id)
    mlflow.log_params({"cluster.trainjob": f"{ref.namespace}/{ref.name}",
                       "cluster.train.num_nodes": params.cluster.train.num_nodes})
    result = out_dir / RESULT_FILE  # the workers' summary: kept in MLflow, not in the model
    mlflow.log_dict(json.loads(result.read_text()), "meta/trainjob_result.json")
    result.unlink()
    if (out_dir / ROUTER).is_file():
        models = sorted(json.loads((out_dir / ROUTER).read_text()))
    else:
        models = ["all"] if params.meta_train.enabled else []
    return MetaTrainOutcome({name: MetaResult() for name in models}, {})
