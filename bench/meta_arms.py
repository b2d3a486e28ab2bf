"""Meta-training where it is meant to help: a small labelled set plus many pseudo-labels of mixed
quality — the ``meta`` kind of ``bench/experiment.py`` (issue 16; arms in
``experiments/meta-busi.yaml``).

The pseudo-labelled pool, built once per (dataset, pool params, code) and shared by every arm
and seed, through the package's step functions as the pipeline runs them:

1. ``pseudo_label.hide_masks_fraction`` of the train masks are hidden (seeded by ``seed``, so
   the same images for every arm);
2. a plain model trained on the remaining labelled records (the labelling champion, registered
   in the cache's MLflow store);
3. ``pseudo_label``: the champion labels the hidden images; the TTA agreement score splits them
   into good and bad task data.

One arm run trains on that pool with the run's seed and scores the val and test splits
(ground truth, native resolution). What the kind reads from an arm:

- ``data``: ``labelled`` (the labelled records only), ``all`` (+ every pseudo-label) or
  ``good`` (+ the good pseudo-labels only); the arm's ``set`` picks plain or meta-training;
- ``routing`` (per-type models only): ``given`` routes each image by its recorded lesion type;
  ``classifier`` by a type classifier (logistic regression on the per-type models' own outputs,
  fitted on the train split's types), so ``normal`` is not given away at test time.

Every arm sees the same number of training images: ``train.epochs`` passes over the whole train
split (labelled or not) — a plain arm on fewer records runs more epochs, a meta arm takes
``epochs × n / (support + query)`` outer steps, shared out among its per-type models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
from filelock import FileLock

from bench.harness import digest, package_code
from lesionflow import lineage, registry
from lesionflow.config import Params
from lesionflow.data.manifest import FINGERPRINT, Record, read_manifest, write_manifest
from lesionflow.data.transforms import load_image
from lesionflow.models.router import Routing
from lesionflow.models.store import load_model
from lesionflow.steps import meta_train as meta_train_step
from lesionflow.steps.evaluate import score_model
from lesionflow.steps.pseudo_label import REPORT, pseudo_label
from lesionflow.training import labelled, seed_everything

POOL_SECTIONS = {"ingest", "model", "train", "pseudo_label", "evaluate", "seed"}  # what the pool depends on


def pseudo_pool(params: Params, dataset: Path, cache: Path) -> Path:
    """The pseudo-labelled dataset (``pool/``) and the labelled-only one (``labelled/``) for
    ``params``' pool sections, built once under a lock by whichever process gets there first."""
    key = digest(params.model_dump(mode="json", include=POOL_SECTIONS), dataset.name,
                 package_code())
    out = cache / "datasets" / f"{dataset.name}-pseudo-{key}"
    with FileLock(f"{out}.lock"):
        if (out / "pool").is_dir():
            return out
        shutil.rmtree(out, ignore_errors=True)  # a build killed half-way starts over
        plain = params.with_section("meta_train", enabled=False)
        name = f"labeller-{key}"
        with mlflow.start_run(run_name="pseudo pool: labeller", nested=True):
            # a model name nothing is registered under: no champion, so this only hides masks
            pseudo_label(plain.with_section("runtime", model_name=f"{name}-none"), dataset, out / "labelled")
            n_labelled = len(labelled(read_manifest(out / "labelled"), "train"))
            n_train = sum(r.split == "train" for r in read_manifest(dataset))
            labeller = plain.with_section("train", epochs=max(1, round(params.train.epochs * n_train / n_labelled)))
            meta_train_step.run(labeller, out / "labelled", out / "labeller")
            version = registry.register_model(load_model(out / "labeller"), name=name, metrics={}, lineage={
                lineage.TAG_DATASET_MD5: dataset.name, lineage.TAG_PARAMS_HASH: labeller.digest(),
                lineage.TAG_PIPELINE_RUN_ID: "experiment"})
            registry.move_alias(name, "champion", version, why="labels the experiment's pool", action="set")
        with mlflow.start_run(run_name="pseudo pool: pseudo-label", nested=True):
            pseudo_label(plain.with_section("runtime", model_name=name), dataset, out / "staged")
        keep_good_only(out / "staged", out / "good", linked_as=Path("..") / "pool")
        (out / "staged").rename(out / "pool")
    return out


def keep_good_only(pool: Path, out: Path, linked_as: Path) -> None:
    """``pool`` without its bad pseudo-labels: images and masks linked (not copied) through
    ``linked_as``, the path from ``out`` to where ``pool`` will live."""
    out.mkdir()
    for sub in ("images", "masks"):
        (out / sub).symlink_to(linked_as / sub)
    shutil.copy(pool / FINGERPRINT, out / FINGERPRINT)
    write_manifest(out, [r for r in read_manifest(pool) if not (r.kind == "pseudo_label" and r.quality == "bad")])


def budgeted(params: Params, data: Path, n_train: int) -> Params:
    """``params`` with plain epochs or meta outer steps set so the arm sees ``train.epochs × n_train``
    training images (see the module docstring)."""
    records = labelled(read_manifest(data), "train")
    images = params.train.epochs * n_train
    if not params.meta_train.enabled:
        return params.with_section("train", epochs=max(1, round(images / len(records))))
    mcfg = params.meta_train
    models = len({r.lesion_type for r in records}) if mcfg.per_lesion_type else 1
    steps = max(1, round(images / (mcfg.support_size + mcfg.query_size) / models))
    return params.with_section("meta_train", outer_steps=steps, rerank_every=max(1, steps // 6))


class ClassifiedRouter(Routing):
    """Per-type models routed by a type classifier instead of the recorded type: a logistic
    regression on what each per-type model sees in the image (its mean and peak probability, its
    predicted area and its confidence inside it)."""

    def __init__(self, router, dataset: Path, train: list[Record], threshold: float):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.models, self.threshold = router.models, threshold
        images = [load_image(dataset, r) for r in train]
        self.classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        self.classifier.fit(self.features(images), [r.lesion_type for r in train])

    def features(self, images: list[np.ndarray]) -> np.ndarray:
        columns = []
        for lesion_type in self.lesion_types:
            probs = self.models[lesion_type].predict_proba(images)
            columns.append([(p.mean(), p.max(), (p > self.threshold).mean(),
                             p[p > self.threshold].mean() if (p > self.threshold).any() else 0.0) for p in probs])
        return np.concatenate([np.asarray(c) for c in columns], axis=1)

    def predict_types(self, images: list[np.ndarray]) -> list[str]:
        return list(self.classifier.predict(self.features(images)))

    def predict_proba(self, images, lesion_types=None, batch_size: int = 8):
        return super().predict_proba(images, self.predict_types(images), batch_size)


def run_arm(params: Params, dataset: Path, arm: dict, seed: int, cache: Path) -> dict[str, float]:
    """val_dice, test_dice and test Dice per lesion type (on ``normal``, empty truth: the share of
    images left empty); the pool's counts; for ``routing: classifier`` the router's test accuracy
    and the test Dice had the recorded type been given."""
    data_kind, routing = arm.get("data", "good"), arm.get("routing", "given")
    if data_kind not in ("labelled", "all", "good") or routing not in ("given", "classifier"):
        raise SystemExit(f"data must be labelled|all|good and routing given|classifier, not {data_kind!r}, {routing!r}")
    if routing == "classifier" and not params.meta_train.per_lesion_type:
        raise SystemExit("routing: classifier needs per-type models (meta_train.per_lesion_type=true)")
    pool = pseudo_pool(params, dataset, cache)
    data = pool / {"labelled": "labelled", "all": "pool", "good": "good"}[data_kind]
    records = read_manifest(dataset)
    train_params = budgeted(params, data, sum(r.split == "train" for r in records))
    train_params = train_params.model_copy(update={"seed": seed})  # the split and the pool stay; training varies
    seed_everything(seed, params.train.deterministic)
    out = cache / "models" / f"{dataset.name}-{seed}-{digest(train_params.model_dump(mode='json', exclude={'runtime'}), data_kind)}"
    shutil.rmtree(out, ignore_errors=True)
    meta_train_step.run(train_params, data, out)
    model = load_model(out)
    val, test = labelled(records, "val"), labelled(records, "test")
    threshold = params.evaluate.threshold
    metrics: dict[str, float] = {}
    if routing == "classifier":
        metrics["test_dice_given_type"] = score_model(model, dataset, test, threshold).overall("dice")
        model = ClassifiedRouter(model, dataset, [r for r in records if r.split == "train"], threshold)
        predicted = model.predict_types([load_image(dataset, r) for r in test])
        metrics["router_accuracy"] = float(np.mean([p == r.lesion_type for p, r in zip(predicted, test, strict=True)]))
    metrics["val_dice"] = score_model(model, dataset, val, threshold).overall("dice")
    scored = score_model(model, dataset, test, threshold)
    metrics["test_dice"] = scored.overall("dice")
    for lesion_type, row in scored.table.items():
        if lesion_type != "overall":
            metrics[f"test_dice_{lesion_type}"] = row["dice"]
    counts = json.loads((pool / "pool" / REPORT).read_text())
    metrics.update({f"pool_{k}": float(v) for k, v in counts["counts"].items()})
    metrics["pool_pseudo_dice"] = float(counts["hidden_mask_dice"])
    metrics["train_records"] = float(len(labelled(read_manifest(data), "train")))
    shutil.rmtree(out, ignore_errors=True)
    return metrics
