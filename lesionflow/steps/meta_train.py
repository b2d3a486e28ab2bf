"""Meta-train step: MAML over good/bad task data, one model or one per lesion type.

Tasks are the training records grouped by ``meta_train.task_by``; records whose pseudo-label
quality was judged ``bad`` form each task's bad pool, everything else (ground truth, good
pseudo-labels, corrections) its good pool. ``meta_train.enabled: false`` trains the plain
supervised baseline on the same data instead, so both arms of a comparison go through one step.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlflow

from lesionflow.config import Params
from lesionflow.data.manifest import Record, read_manifest
from lesionflow.losses import dice_bce_loss
from lesionflow.meta import MetaResult, Task, meta_train
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import save_model
from lesionflow.steps.train import new_segmenter, train
from lesionflow.training import SegmentationDataset, labelled


@dataclass
class MetaTrainOutcome:
    results: dict[str, MetaResult]  # per trained model ("all", or one per lesion type)
    pools: dict[str, dict[str, int]]  # task → {"good": n, "bad": n}


def task_key(record: Record, task_by: str) -> str:
    return getattr(record, task_by)


def build_tasks(params: Params, dataset_dir: Path, records: list[Record],
                model: Segmenter) -> tuple[list[Task], dict[str, dict[str, int]]]:
    """One ``Task`` per ``task_by`` value over one in-memory dataset of the given train records."""
    data = SegmentationDataset(dataset_dir, records, model, augment=params.train.augment, seed=params.seed)
    kinds = [r.kind for r in records]
    members: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        members[task_key(record, params.meta_train.task_by)].append(i)
    tasks, pools = [], {}
    for name in sorted(members):
        bad = [i for i in members[name] if records[i].quality == "bad"]
        good = [i for i in members[name] if records[i].quality != "bad"]
        if len(good) + len(bad) < 2:
            print(f"task {name!r} has {len(good) + len(bad)} record(s): too few to split, left out")
            continue
        tasks.append(Task.split(name, data, good, bad, kinds=kinds, seed=params.seed))
        pools[name] = {"good": len(good), "bad": len(bad)}
    return tasks, pools


def _train_one(params: Params, dataset_dir: Path, records: list[Record], val_records: list[Record],
               prefix: str) -> tuple[Segmenter, MetaResult, dict[str, dict[str, int]]]:
    model = new_segmenter(params, dataset_dir)
    tasks, pools = build_tasks(params, dataset_dir, records, model)
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


def run(params: Params, dataset_dir: Path, out_dir: Path) -> MetaTrainOutcome:
    mcfg = params.meta_train
    mlflow.log_params({f"meta_train.{k}": v for k, v in mcfg.model_dump().items()})
    if not mcfg.enabled:
        train(params, dataset_dir, out_dir)
        return MetaTrainOutcome({}, {})
    manifest = read_manifest(dataset_dir)
    records, val_records = labelled(manifest, "train"), labelled(manifest, "val")
    mlflow.log_params({f"model.{k}": v for k, v in params.model.model_dump().items()})
    mlflow.log_metrics({"n_good": sum(r.quality != "bad" for r in records),
                        "n_bad": sum(r.quality == "bad" for r in records),
                        "n_corrections": sum(r.kind == "correction" for r in records)})
    if mcfg.per_lesion_type:
        by_type: dict[str, list[Record]] = defaultdict(list)
        for r in records:
            by_type[r.lesion_type].append(r)
        models, results, pools = {}, {}, {}
        for lesion_type in sorted(by_type):
            model, result, type_pools = _train_one(
                params, dataset_dir, by_type[lesion_type],
                [r for r in val_records if r.lesion_type == lesion_type], prefix=f"{lesion_type}.")
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
