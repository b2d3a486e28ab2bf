"""Is the review queue worth following? A Kvasir-SEG learning curve: images to label chosen at
random vs by the queue.

Protocol (issue 14), all through the package's own code:

1. Kvasir-SEG ingested once with ``configs/kvasir-seg.yaml`` (train / val / test by the config's
   split), cached under ``--cache``, keyed by everything that changes it;
2. per seed, one starting pool: ``--start`` train images drawn at random are labelled, the rest of
   the train split is the unlabelled pool (its masks stay hidden until an image is picked);
3. each round a model is trained from scratch on the labelled set — the same budget every round
   and every arm: ``--images`` images seen (each labelled image equally often), one-cycle LR, the
   checkpoint kept by validation Dice (at training resolution, reported as ``val Dice``) — then
   scored on the test split at each image's own resolution; then
   ``--batch`` more images are picked from the pool and labelled:
   - ``random``: a seeded draw (the baseline);
   - ``queue``: ``lesionflow review next``'s ranking — every pool image's TTA uncertainty under
     this round's model (``review.score_pool``) ranked and picked by ``--strategy`` (default
     ``diversity-weighted``);
4. both arms share each seed's round 0 (same start, same model); seeds change the starting pool,
   the initial weights, the data order and the augmentation.

The test split is only read for the curve's report; nothing is chosen on it. Every round is logged
to the cache's own SQLite MLflow store: one run per (arm, seed) under one parent, with
``val_dice`` / ``test_dice`` stepped by the number of labelled images (MLflow's chart view draws the
curves); the parent holds the table, the results and the plot.

    python bench/learning_curve.py [--seeds 3] [--start 50] [--batch 50] [--rounds 4]
        [--images 3200] [--strategy diversity-weighted] [--set key=value ...] [--plot F.png]
    # one process per seed on a shared MLflow server, then one table, plot and parent run:
    python bench/learning_curve.py --seed-list 0 --out s0.json --set runtime.mlflow_tracking_uri=URL  (1, 2 …)
    python bench/learning_curve.py --merge s0.json s1.json s2.json --plot F.png --set runtime.mlflow_tracking_uri=URL

Kvasir-SEG (Jha et al., MMM 2020): research use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.harness import cached_dataset, spread  # noqa: E402
from lesionflow import tracking  # noqa: E402
from lesionflow.config import Params  # noqa: E402
from lesionflow.data.manifest import Record, read_manifest  # noqa: E402
from lesionflow.data.transforms import load_image  # noqa: E402
from lesionflow.models.pyfunc import SegmentationModel  # noqa: E402
from lesionflow.review import strategies  # noqa: E402
from lesionflow.review.queue import PoolItem, score_pool  # noqa: E402
from lesionflow.steps.evaluate import score_model  # noqa: E402
from lesionflow.steps.train import new_segmenter  # noqa: E402
from lesionflow.training import SegmentationDataset, fit, labelled, seed_everything  # noqa: E402

# small and quick: the question is which images to label, not how good a model gets
DEFAULTS = ["train.image_size=128", "model.arch=resunet", "model.base_channels=16", "train.augment=flips",
            "train.loss=dice_bce", "train.deep_supervision=0", "train.ema_decay=null", "train.max_minutes=null",
            "train.device=cpu", "train.batch_size=8"]
EPOCHS = 8  # validation passes per round; each epoch sees --images / EPOCHS images


class Tiled(Dataset):
    """``base`` visited in a fixed order of ``length`` indices: every labelled image equally often
    (±1), so a round sees the same number of images whatever the labelled set's size."""

    def __init__(self, base: SegmentationDataset, length: int, seed: int):
        order = np.random.default_rng(seed).permutation(len(base))
        self.base, self.indices = base, np.resize(order, length)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]


def train_round(params: Params, dataset: Path, chosen: list[Record], val: SegmentationDataset | None,
                val_records: list[Record], images: int, seed: int):
    """A model trained from scratch on ``chosen`` for ``images`` images seen; (model, its best
    validation Dice at training resolution, val set)."""
    seed_everything(seed, params.train.deterministic)
    model = new_segmenter(params, dataset)
    val = val or SegmentationDataset(dataset, val_records, model)
    base = SegmentationDataset(dataset, chosen, model, augment=params.train.augment, seed=seed)
    fitted = fit(model, Tiled(base, images // EPOCHS, seed), val, params.train.model_copy(update={"epochs": EPOCHS}),
                 seed=seed)
    return model.eval(), fitted.best_val_dice, val


def pick(arm: str, model, params: Params, dataset: Path, pool: list[Record], n: int, seed: int,
         strategy: str) -> list[Record]:
    if arm == "random":
        return [pool[i] for i in np.random.default_rng(seed).choice(len(pool), n, replace=False)]
    items = [PoolItem(r.id, f"dataset:{r.id}", r.lesion_type, r.group, r.image_sha256,
                      lambda r=r: load_image(dataset, r)) for r in pool]
    candidates, _ = score_pool(SegmentationModel.wrap(model, params.evaluate.threshold), items)
    chooser = strategies.make(strategy, params)
    picked = chooser.select(candidates, chooser.rank(candidates), n)
    by_id = {r.id: r for r in pool}
    return [by_id[candidates[i].id] for i in picked]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for arm, colour in zip(results["arms"], ("tab:grey", "tab:blue"), strict=True):
        sizes = sorted({r["labelled"] for r in results["runs"] if r["arm"] == arm})
        values = [[r["test_dice"] for r in results["runs"] if r["arm"] == arm and r["labelled"] == n] for n in sizes]
        ax.plot(sizes, [np.mean(v) for v in values], "o-", color=colour, label=results["arm_labels"][arm])
        ax.fill_between(sizes, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.2)
    ax.set(xlabel="labelled Kvasir-SEG train images", ylabel="test Dice (mean, min–max over seeds)",
           title=f"Learning curve, {len(results['seeds'])} seeds, {results['images']} images seen per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: dict) -> str:
    sizes = sorted({r["labelled"] for r in results["runs"]})
    lines = ["| labelled | " + " | ".join(f"{results['arm_labels'][a]} test Dice" for a in results["arms"])
             + " | queue − random (mean over seeds) |", "|---|" + "---|" * (len(results["arms"]) + 1)]
    for n in sizes:
        cells, by_arm = [], {}
        for arm in results["arms"]:
            rows = {r["seed"]: r["test_dice"] for r in results["runs"] if r["arm"] == arm and r["labelled"] == n}
            by_arm[arm] = rows
            cells.append(spread(list(rows.values())))
        gaps = [by_arm["queue"][s] - by_arm["random"][s] for s in by_arm["random"] if s in by_arm["queue"]]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {np.mean(gaps):+.3f} ({min(gaps):+.3f}…{max(gaps):+.3f}) |")
    return "\n".join(lines)


def merge(parts: list[dict], params: Params, plot_path: Path | None, out: Path | None) -> None:
    """One table, plot and MLflow parent for seeds run as separate processes: the per-seed parent
    runs are re-parented under it (MLflow nests runs by the ``mlflow.parentRunId`` tag)."""
    results = {**parts[0], "seeds": sorted(s for p in parts for s in p["seeds"]),
               "runs": [r for p in parts for r in p["runs"]],
               "total_seconds": sum(p["total_seconds"] for p in parts)}
    text = table(results)
    tracking.connect(params)
    with mlflow.start_run(run_name=f"learning curve: {results['arm_labels']['queue']} vs random, "
                                   f"seeds {results['seeds']}") as parent:
        harness.nest_under(parent.info.run_id, [part["parent_run_id"] for part in parts])
        results["parent_run_id"] = parent.info.run_id
        mlflow.log_params({"seeds": str(results["seeds"]), "images_per_round": results["images"],
                           "image_size": results["image_size"]})
        harness.log_report(text, "learning_curve.md", results, plot_path, plot)
    print(text)
    print(f"MLflow parent run {parent.info.run_id} (the per-seed runs nested under it)")
    if out:
        out.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--start", type=int, default=50, help="labelled images before round 1")
    parser.add_argument("--batch", type=int, default=50, help="images labelled per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of labelling after the start")
    parser.add_argument("--images", type=int, default=3200, help="images seen per training, every round")
    parser.add_argument("--strategy", default="diversity-weighted", choices=["entropy", "tta", "diversity-weighted"],
                        help="the queue's strategy")
    parser.add_argument("--seed-list", type=int, nargs="+", default=None,
                        help="run these seeds only (e.g. one per core; merge the --out files with --merge)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="instead of running: one table, plot and MLflow parent for these --out files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument("--cache", type=Path, default=REPO / ".lesionflow" / "bench-learning-curve")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    args = parser.parse_args()

    cache = args.cache.resolve()
    params = harness.load_params("kvasir-seg", cache, "learning-curve-bench", [*DEFAULTS, *args.set])
    if args.merge:
        merge([json.loads(p.read_text()) for p in args.merge], params, args.plot, args.out)
        return

    torch.set_num_threads(args.threads)
    strategy = args.strategy
    tracking.connect(params)
    dataset, _ = cached_dataset(params, cache)
    records = read_manifest(dataset)
    train_records, val_records, test_records = (labelled(records, s) for s in ("train", "val", "test"))
    seeds = args.seed_list or list(range(args.seeds))
    results = {"arms": ["random", "queue"], "arm_labels": {"random": "random", "queue": f"queue ({strategy})"},
               "seeds": seeds, "images": args.images, "image_size": params.train.image_size,
               "n": {"train": len(train_records), "val": len(val_records), "test": len(test_records)},
               "runs": []}
    print(f"Kvasir-SEG train {len(train_records)} (start {args.start}, +{args.batch} × {args.rounds}), "
          f"val {len(val_records)}, test {len(test_records)}; queue: {strategy}; seeds {seeds}", flush=True)
    started = time.monotonic()
    val = None
    with mlflow.start_run(run_name=f"learning curve: random vs {strategy}") as parent:
        mlflow.log_params({"start": args.start, "batch": args.batch, "rounds": args.rounds,
                           "images_per_round": args.images, "strategy": strategy, "seeds": str(seeds),
                           **{o.split("=")[0]: o.split("=", 1)[1] for o in [*DEFAULTS, *args.set]}})
        for seed in seeds:
            start_ids = np.random.default_rng(1000 + seed).choice(len(train_records), args.start, replace=False)
            start = [train_records[i] for i in sorted(start_ids)]
            round0 = None
            for arm in results["arms"]:
                chosen = list(start)
                with mlflow.start_run(run_name=f"{arm} seed {seed}", nested=True):
                    mlflow.set_tags({"arm": arm, "seed": str(seed), "strategy": strategy if arm == "queue" else "random"})
                    for round_ in range(args.rounds + 1):
                        t0 = time.monotonic()
                        if round_ == 0 and round0 is not None:
                            model, scores = round0  # both arms share round 0
                        else:
                            model, val_dice, val = train_round(params, dataset, chosen, val, val_records,
                                                               args.images, seed)
                            scores = {"val": val_dice, "test": score_model(
                                model, dataset, test_records, params.evaluate.threshold).overall("dice")}
                            if round_ == 0:
                                round0 = (model, scores)
                        mlflow.log_metrics({"val_dice": scores["val"], "test_dice": scores["test"]}, step=len(chosen))
                        row = {"arm": arm, "seed": seed, "round": round_, "labelled": len(chosen),
                               "val_dice": scores["val"], "test_dice": scores["test"]}
                        results["runs"].append(row)
                        if round_ < args.rounds:
                            taken = {r.id for r in chosen}
                            pool = [r for r in train_records if r.id not in taken]
                            picked = pick(arm, model, params, dataset, pool, args.batch, seed * 100 + round_, strategy)
                            row["picked"] = [r.id for r in picked]  # what the next round adds, to inspect
                            chosen += picked
                        print(f"{arm:<6} seed {seed} round {round_}: {row['labelled']} labelled, val Dice "
                              f"{row['val_dice']:.3f}, test Dice {row['test_dice']:.3f} "
                              f"({time.monotonic() - t0:.0f} s)", flush=True)
        results["total_seconds"] = time.monotonic() - started
        results["parent_run_id"] = parent.info.run_id
        text = table(results)
        harness.log_report(text, "learning_curve.md", results, args.plot, plot)
    print(text)
    print(f"total {results['total_seconds'] / 60:.1f} min; MLflow parent run {results['parent_run_id']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
