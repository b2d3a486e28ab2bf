"""Warm start vs from scratch: a Kvasir-SEG champion plus a batch of corrected CVC-ClinicDB frames.

The question (seeds 002/003): when reviewers correct frames from a new source, does fine-tuning the
champion (``train.init_from``) reach a from-scratch retrain's quality in less time, and does it keep
what the champion knew? Protocol, all through the package's own code:

1. ingest Kvasir-SEG and CVC-ClinicDB with ``build_dataset`` and the repository's configs
   (``configs/kvasir-seg.yaml``, ``configs/cvc-clinicdb.yaml``: CVC is split by sequence);
2. the champion: plain training (``steps.train.train``) on Kvasir train for ``--epochs``, selected
   on Kvasir val, registered and aliased ``champion`` in the bench's own registry;
3. the corrected set: Kvasir + ``--corrections`` CVC *train* frames (evenly spaced within a few
   randomly chosen training sequences) as ``correction`` records merged by ``corrections.merge``
   — what the ingest step does with reviewer corrections (train split only, weighted
   ``meta_train.correction_weight``; validation stays Kvasir val, as in the pipeline);
4. arms, interleaved per seed (the order rotates so load drift hits every arm):
   ``scratch`` ``--epochs``; ``warm`` ``--warm-epochs`` and ``warm-long`` ``--epochs`` from the
   champion (``train.init_from`` pinned to its version number); ``scratch-2x`` 2 × ``--epochs``,
   the epochs the champion and ``warm-long`` ran together, tells how much of a warm start's gain
   is just the training already behind it (``warm-long`` and ``scratch-2x``: ``--long-seeds``);
5. each arm's kept checkpoint (best Kvasir-val epoch) is scored once on the Kvasir test split and
   once on the CVC test split (sequences never trained on), at each image's own resolution.

Wall time is the whole ``train`` call: decoding the data, the registry load for warm arms, every
epoch and the validation passes. The ingested datasets and the champion are cached under
``--cache`` (keyed by everything that changes them); every run is logged to the cache's own SQLite
MLflow store under one parent run.

    python bench/warm_start.py [--image-size 64] [--epochs 4] [--warm-epochs 1] [--seeds 3]
                               [--long-seeds 3] [--corrections 60] [--cache DIR] [--out F.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np
import torch

from lesionflow import config, corrections, lineage, registry, tracking
from lesionflow.data.fingerprint import write_index
from lesionflow.data.manifest import Record, link_or_copy, read_manifest, staged_dataset
from lesionflow.models.store import load_model
from lesionflow.steps.evaluate import score_model
from lesionflow.steps.train import train
from lesionflow.training import labelled, seed_everything

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.harness import cached_dataset, code_digest, digest, spread  # noqa: E402

# what a cached champion depends on besides its params
TRAIN_CODE = ["training.py", "losses.py", "meta.py", "models/*.py", "steps/train.py"]


def load_params(dataset: str, cache: Path, overrides: list[str]) -> config.Params:
    return harness.load_params(dataset, cache, "warm-start-bench", overrides)


def champion(params: config.Params, dataset: Path, dataset_key: str) -> tuple[str, str, float | None]:
    """(model name, version, training wall s or None when cached): the registered model name carries
    the key of everything that changes the champion, so a cached one is found by name."""
    key = digest(harness.params_that_matter(params), dataset_key, code_digest(TRAIN_CODE),
                 hashlib.sha256(Path(__file__).read_bytes()).hexdigest())
    name = f"warm-bench-champion-{key}"
    version = registry.champion_version(name)
    if version is not None:
        print(f"champion cached: {name} v{version}", flush=True)
        return name, version, None
    champ = params.model_copy(update={"runtime": params.runtime.model_copy(update={"model_name": name})})
    with mlflow.start_run(run_name="champion (Kvasir only)", nested=True), \
            tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        seed_everything(champ.seed, champ.train.deterministic)
        train(champ, dataset, Path(tmp))
        seconds = time.monotonic() - t0
        version = registry.register_model(load_model(Path(tmp)), name=name, metrics={}, lineage={
            lineage.TAG_DATASET_MD5: f"bench-{dataset_key}.dir", lineage.TAG_PARAMS_HASH: champ.digest(),
            lineage.TAG_PIPELINE_RUN_ID: "warm-start-bench"})
    registry.move_alias(name, registry.CHAMPION, version, why="warm-start bench champion", action="set")
    print(f"champion trained in {seconds:.0f} s: {name} v{version}", flush=True)
    return name, version, seconds


def correction_batch(cvc: Path, n: int, per_sequence: int) -> list[Record]:
    """``n`` labelled CVC *train* frames: ``per_sequence`` evenly spaced frames of each of a few
    training sequences, sequences in a fixed random order (the batch is data, not a seed)."""
    by_sequence: dict[str, list[Record]] = defaultdict(list)
    for record in labelled(read_manifest(cvc), "train"):
        by_sequence[record.group].append(record)
    chosen: list[Record] = []
    for sequence in np.random.default_rng(0).permutation(sorted(by_sequence)):
        frames = sorted(by_sequence[sequence], key=lambda r: (r.frame_index or 0, r.id))
        take = min(per_sequence, len(frames), n - len(chosen))
        chosen += [frames[i] for i in np.linspace(0, len(frames) - 1, take).round().astype(int)]
        if len(chosen) == n:
            return chosen
    raise ValueError(f"the CVC train split has only {len(chosen)} frames to correct, {n} asked")


def corrected_dataset(kvasir: Path, cvc: Path, batch: list[Record], corrected_from: str, out: Path) -> None:
    """Kvasir plus the batch as reviewer corrections, joined the way the ingest step joins them."""
    corr = out.parent / f"{out.name}-corrections"
    with staged_dataset(corr) as stage:
        records = []
        for r in batch:
            new_id = f"{corrections.ID_PREFIX}cvc-{r.id}"
            image, mask = f"images/{new_id}.png", f"masks/{new_id}.png"
            link_or_copy(cvc / r.image, stage / image)
            link_or_copy(cvc / r.mask, stage / mask)
            records.append(r.model_copy(update={
                "id": new_id, "kind": "correction", "split": "train", "image": image, "mask": mask,
                "group": corrections.ID_PREFIX + r.group, "corrected_from": corrected_from,
                "frame_index": None, "key_frame": False}))
        write_index(stage, records)
    report = corrections.merge(kvasir, corr, out)
    assert report.added == len(batch) and not report.held_out, report


def with_overrides(params: config.Params, **train: object) -> config.Params:
    return params.with_section("train", **train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="champion, scratch and warm-long")
    parser.add_argument("--warm-epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of scratch and warm")
    parser.add_argument("--long-seeds", type=int, default=3,
                        help="seeds of warm-long and scratch-2x (the first ones)")
    parser.add_argument("--corrections", type=int, default=60)
    parser.add_argument("--per-sequence", type=int, default=10)
    # one thread: on the shared 2-core machine (load ~6) two threads made a step 6x slower
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=REPO / ".lesionflow" / "bench-warm-start")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache.resolve()
    started = time.monotonic()

    overrides = [f"train.image_size={args.image_size}", f"train.epochs={args.epochs}",
                 "train.max_minutes=null", "model.base_channels=16", "model.depth=4", "train.device=cpu"]
    params = load_params("kvasir-seg", cache, overrides)
    tracking.connect(params)
    kvasir, kvasir_key = cached_dataset(params, cache)
    cvc, _ = cached_dataset(load_params("cvc-clinicdb", cache, overrides), cache)
    tests = {"kvasir": (kvasir, labelled(read_manifest(kvasir), "test")),
             "cvc": (cvc, labelled(read_manifest(cvc), "test"))}
    threshold = params.evaluate.threshold

    def score(model) -> dict[str, float]:
        return {name: score_model(model, data, records, threshold).overall("dice")
                for name, (data, records) in tests.items()}

    results: dict = {"image_size": args.image_size, "epochs": args.epochs, "warm_epochs": args.warm_epochs,
                     "n_corrections": args.corrections, "n_test": {k: len(v[1]) for k, v in tests.items()},
                     "runs": []}
    with mlflow.start_run(run_name="warm start vs scratch") as parent, \
            tempfile.TemporaryDirectory(prefix="warm-bench-") as tmp:
        tmp = Path(tmp)
        mlflow.log_params({k: v for k, v in vars(args).items() if k not in ("cache", "out")})
        name, version, champion_seconds = champion(params, kvasir, kvasir_key)
        champion_scores = score(registry.load_model(name, version))
        results["champion"] = {"model": name, "version": version, "wall_seconds": champion_seconds,
                               "test_dice": champion_scores}
        mlflow.set_tags({"champion": f"{name}@{version}"})
        mlflow.log_metrics({f"champion.test.{k}.dice": v for k, v in champion_scores.items()})
        print(f"champion {name} v{version}: test Dice Kvasir {champion_scores['kvasir']:.3f}, "
              f"CVC {champion_scores['cvc']:.3f}", flush=True)

        batch = correction_batch(cvc, args.corrections, args.per_sequence)
        merged = tmp / "corrected"
        corrected_dataset(kvasir, cvc, batch, version, merged)
        sequences = sorted({r.group for r in batch}, key=lambda g: int(g) if g.isdigit() else g)
        results["correction_sequences"] = sequences
        n_train = len(labelled(read_manifest(merged), "train"))
        print(f"corrected set: {n_train} train records ({args.corrections} CVC frames from sequences "
              f"{', '.join(sequences)}); val {len(labelled(read_manifest(merged), 'val'))} (Kvasir)", flush=True)

        base = params.model_copy(update={"runtime": params.runtime.model_copy(update={"model_name": name})})
        # pinned to the number, not the alias: what every warm arm starts from is fixed
        arms = {"scratch": with_overrides(base, init_from=None),
                "warm": with_overrides(base, init_from=version, epochs=args.warm_epochs),
                "warm-long": with_overrides(base, init_from=version),
                "scratch-2x": with_overrides(base, init_from=None, epochs=2 * args.epochs)}
        for seed in range(args.seeds):
            names = [a for a in arms if a in ("scratch", "warm") or seed < args.long_seeds]
            for arm in names[seed % len(names):] + names[:seed % len(names)]:
                arm_params = arms[arm].model_copy(update={"seed": seed})
                out = tmp / f"{arm}-{seed}"
                with mlflow.start_run(run_name=f"{arm} seed {seed}", nested=True):
                    mlflow.set_tags({"arm": arm, "seed": str(seed),
                                     lineage.TAG_INIT_FROM_VERSION: arm_params.train.init_from or lineage.NONE})
                    t0 = time.monotonic()
                    # as the pipeline's step does: the initial weights depend on the seed alone
                    seed_everything(seed, arm_params.train.deterministic)
                    fit = train(arm_params, merged, out)
                    wall = time.monotonic() - t0
                    scores = score(load_model(out))
                    mlflow.log_metrics({"wall_seconds": wall, **{f"test.{k}.dice": v for k, v in scores.items()}})
                row = {"arm": arm, "seed": seed, "epochs": arm_params.train.epochs, "wall_seconds": wall,
                       "fit_seconds": fit.seconds, "best_epoch": fit.best_epoch,
                       "best_val_dice": fit.best_val_dice, "test_dice": scores}
                results["runs"].append(row)
                print(f"{arm:<10} seed {seed}: {wall:5.0f} s, best epoch {fit.best_epoch + 1}/"
                      f"{arm_params.train.epochs}, val {fit.best_val_dice:.3f}, test Dice Kvasir "
                      f"{scores['kvasir']:.3f} CVC {scores['cvc']:.3f}", flush=True)
        results["total_seconds"] = time.monotonic() - started
        results["parent_run_id"] = parent.info.run_id
        mlflow.log_dict(results, "results.json")

    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    runs = results["runs"]
    scratch_wall = {r["seed"]: r["wall_seconds"] for r in runs if r["arm"] == "scratch"}
    n_test = results["n_test"]
    print(f"\nKvasir-SEG champion + {results['n_corrections']} corrected CVC-ClinicDB frames, "
          f"{results['image_size']}², {results['epochs']} epochs from scratch; test Dice mean "
          f"(min–max over seeds); Kvasir test n={n_test['kvasir']}, CVC test n={n_test['cvc']}")
    print("| arm | epochs | seeds | wall s | wall vs scratch (same seed) | Kvasir test Dice | CVC test Dice |")
    print("|---|---|---|---|---|---|---|")
    champ = results["champion"]
    wall = f"{champ['wall_seconds']:.0f}" if champ["wall_seconds"] else "cached"
    print(f"| champion (Kvasir only, before corrections) | {results['epochs']} | 1 | {wall} | | "
          f"{champ['test_dice']['kvasir']:.3f} | {champ['test_dice']['cvc']:.3f} |")
    for arm in ("scratch", "warm", "warm-long", "scratch-2x"):
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        ratios = [r["wall_seconds"] / scratch_wall[r["seed"]] for r in rows if r["seed"] in scratch_wall]
        ratio = "1" if arm == "scratch" else spread(ratios)
        print(f"| {arm} | {rows[0]['epochs']} | {len(rows)} | {np.mean([r['wall_seconds'] for r in rows]):.0f} | "
              f"{ratio}× | {spread([r['test_dice']['kvasir'] for r in rows])} | "
              f"{spread([r['test_dice']['cvc'] for r in rows])} |")
    print(f"total bench wall time {results['total_seconds'] / 60:.1f} min; MLflow parent run "
          f"{results['parent_run_id']}")


if __name__ == "__main__":
    main()
