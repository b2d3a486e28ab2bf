"""Meta-training vs plain training on real data, same network and same budget (issue #4).

Protocol, all through the package's step functions (the code the pipeline components call):

1. ingest the dataset; hide the masks of ``--hide`` of the training split (they become the
   unlabelled pool);
2. train a plain model on the remaining labelled records → the champion that labels;
3. pseudo-label: the champion labels the hidden images and scores every training record
   (TTA agreement) → good / bad task data;
4. on that dataset, with the same budget in training images seen, train
   - ``plain``: supervised, all records (good and bad) alike,
   - ``meta``: MAML over tasks = lesion types (BUSI) or sources (polyps), one shared model,
   - ``meta per type``: one MAML model per lesion type / source (budget split evenly);
5. score each on the held-out test split (ground truth), per type, with the false-positive
   rate on lesion-free images (BUSI "normal").

    python bench/meta_vs_plain.py busi    [--image-size 128] [--epochs 6] [--hide 0.5]
    python bench/meta_vs_plain.py polyps  # Kvasir-SEG + CVC-ClinicDB, one task per source

For ``polyps`` the two folders are combined (symlinks, no copy) into one source whose metadata
sets ``lesion_type`` to ``polyp-kvasir`` / ``polyp-cvc``: the source becomes the task key and the
per-type tables become per-source tables. CVC frames keep their sequence as group.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesionflow import config, lineage, registry, tracking
from lesionflow.data.manifest import read_manifest
from lesionflow.models.store import load_model
from lesionflow.steps import meta_train as meta_train_step
from lesionflow.steps.evaluate import score_model
from lesionflow.steps.ingest import build_dataset
from lesionflow.steps.pseudo_label import pseudo_label
from lesionflow.training import labelled

DATA = REPO.parent / "shared" / "data"


def polyp_source(root: Path) -> list[str]:
    """Kvasir-SEG + CVC-ClinicDB as one generic source: images/, masks/, metadata.csv."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for image in sorted((DATA / "kvasir-seg" / "images").iterdir()):
        rid = f"kvasir_{image.stem}"
        (root / "images" / f"{rid}{image.suffix}").symlink_to(image)
        (root / "masks" / f"{rid}.png").symlink_to(DATA / "kvasir-seg" / "masks" / f"{image.stem}.png")
        rows.append({"id": rid, "lesion_type": "polyp-kvasir", "group": rid})
    sequences = {r["frame"]: r["sequence"] for r in csv.DictReader(open(DATA / "cvc-clinicdb" / "sequences.csv"))}
    for image in sorted((DATA / "cvc-clinicdb" / "images").iterdir()):
        rid = f"cvc_{image.stem}"
        (root / "images" / f"{rid}.png").symlink_to(image)
        (root / "masks" / f"{rid}.png").symlink_to(DATA / "cvc-clinicdb" / "masks" / image.name)
        rows.append({"id": rid, "lesion_type": "polyp-cvc", "group": f"cvc_seq_{sequences[image.stem]}"})
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "lesion_type", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return [f"ingest.source={root}", "ingest.metadata_csv=metadata.csv",
            "ingest.columns={id: id, lesion_type: lesion_type, group: group}", "ingest.max_side=384"]


def budget_overrides(n_images: int, epochs: int, steps_per_model: int, cfg: config.Params) -> list[str]:
    """Same budget in images seen: epochs × n for plain, outer steps × (support + query) for meta."""
    per_step = cfg.meta_train.support_size + cfg.meta_train.query_size
    return [f"train.epochs={epochs}", f"meta_train.outer_steps={max(1, round(epochs * n_images / per_step / steps_per_model))}",
            f"meta_train.rerank_every={max(1, round(epochs * n_images / per_step / steps_per_model / 6))}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["busi", "polyps"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--hide", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lesionflow-meta-") as tmp:
        tmp = Path(tmp)
        if args.dataset == "busi":
            source = [f"ingest.source={DATA / 'busi'}", "ingest.metadata_csv=labels.csv",
                      "ingest.columns={id: id, lesion_type: lesion_type}", "model.in_channels=1"]
        else:
            source = polyp_source(tmp / "source")
        base = source + [f"runtime.workdir={tmp / 'work'}", f"train.image_size={args.image_size}",
                         f"pseudo_label.hide_masks_fraction={args.hide}", "runtime.model_name=experiment"]
        params = config.load(REPO / "params.yaml", base)
        tracking.connect(params)
        dataset = tmp / "dataset"
        build_dataset(params, dataset)
        started = time.monotonic()

        # 1-2: the labelling champion, trained plainly on the labelled part only
        with mlflow.start_run(run_name="labels-only"):
            unlabelled_pool = tmp / "labels-only"
            pseudo_label(params, dataset, unlabelled_pool)  # no champion yet: hides masks only
            n_labelled = len(labelled(read_manifest(unlabelled_pool), "train"))
            champ_params = config.load(REPO / "params.yaml", base + budget_overrides(n_labelled, args.epochs, 1, params)
                                       + ["meta_train.enabled=false"])
            meta_train_step.run(champ_params, unlabelled_pool, tmp / "champion")
            version = registry.register_model(load_model(tmp / "champion"), name="experiment", metrics={},
                                              lineage={lineage.TAG_DATASET_MD5: "experiment.dir",
                                                       lineage.TAG_PARAMS_HASH: champ_params.digest(),
                                                       lineage.TAG_PIPELINE_RUN_ID: "experiment"})
            registry.move_alias("experiment", "champion", version, why="labelling model", action="set")

        # 3: pseudo-labels + good/bad
        with mlflow.start_run(run_name="pseudo-label"):
            labelled_dir = tmp / "pseudo"
            report = pseudo_label(params, dataset, labelled_dir)
        records = read_manifest(labelled_dir)
        n_train = len(labelled(records, "train"))
        types = sorted({r.lesion_type for r in records})
        test = labelled(read_manifest(dataset), "test")

        arms = {
            "plain": budget_overrides(n_train, args.epochs, 1, params) + ["meta_train.enabled=false"],
            "meta": budget_overrides(n_train, args.epochs, 1, params),
            "meta per type": budget_overrides(n_train, args.epochs, len(types), params)
            + ["meta_train.per_lesion_type=true"],
        }
        results = {"dataset": args.dataset, "image_size": args.image_size, "epochs_budget": args.epochs,
                   "hidden_fraction": args.hide, "pseudo_label": report.__dict__, "n_train": n_train,
                   "n_test": len(test), "arms": {}}
        for arm, overrides in arms.items():
            arm_params = config.load(REPO / "params.yaml", base + overrides)
            t0 = time.monotonic()
            with mlflow.start_run(run_name=arm):
                meta_train_step.run(arm_params, labelled_dir, tmp / arm)
                score = score_model(load_model(tmp / arm), dataset, test, params.evaluate.threshold)
            results["arms"][arm] = {"table": score.table, "train_seconds": time.monotonic() - t0}
            print(f"{arm}: overall dice {score.overall('dice'):.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
        results["total_seconds"] = time.monotonic() - started

    print(f"\n{args.dataset}: test split n={len(test)}, train n={n_train} "
          f"({report.counts['pseudo_labelled']} pseudo-labelled; good {report.counts['good']}, "
          f"bad {report.counts['bad']}; pseudo-label Dice vs hidden truth {report.hidden_mask_dice:.3f}); "
          f"budget {args.epochs} epochs-equivalent at {args.image_size}px")
    header = f"{'arm':<14}" + "".join(f"{t:>16}" for t in types + ["overall"])
    print(header)
    for arm, res in results["arms"].items():
        print(f"{arm:<14}" + "".join(f"{res['table'][t]['dice']:>16.3f}" for t in types + ["overall"]))
    for arm, res in results["arms"].items():
        fp = res["table"]["overall"]["false_positive_rate"]
        if not math.isnan(fp):
            print(f"false-positive rate on lesion-free test images, {arm}: {fp:.3f} "
                  f"(n={res['table']['overall']['n_lesion_free']})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
