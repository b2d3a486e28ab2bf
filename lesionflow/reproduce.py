"""``lesionflow reproduce VERSION``: rebuild a registered version from its lineage alone.

The version's run holds the full resolved params and its tags the DVC hashes of the dataset it
trained on (the pseudo-labelled one: every label it saw, pinned) and the dataset it was evaluated
on. Both are pulled from the DVC remote by hash, the training step runs again with the stored
params (warm-started from the same parent weights if the original was), the rebuilt model is scored
on the same split, and the per-lesion-type differences to the registered figures are reported.
With ``train.deterministic`` on CPU the weights, and so the metrics, come out identical.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from lesionflow import config, registry, tracking
from lesionflow.config import Params
from lesionflow.data.manifest import read_manifest
from lesionflow.errors import ReproduceError
from lesionflow.lineage import (
    EVALUATION_ARTIFACT,
    NONE,
    PARAMS_ARTIFACT,
    TAG_DATASET_MD5,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_INIT_FROM_VERSION,
    TAG_PSEUDO_DATASET_MD5,
    TAG_REPRODUCES,
    TAG_SERVED_PRECISION,
    TAG_TRAINED_EPOCHS,
    TAG_TRAINED_PRECISION,
    code_version,
    package_dir,
)
from lesionflow.models.store import load_model
from lesionflow.steps import meta_train as meta_train_step
from lesionflow.steps.evaluate import score_model, select, served_predictor
from lesionflow.versioning import restore_dataset

METRICS = ("dice", "iou", "hd95")


@dataclass
class Reproduction:
    version: str
    split: str
    registered: dict[str, dict[str, float]]  # per-type table stored at registration
    rebuilt: dict[str, dict[str, float]]
    datasets: dict[str, str]  # role → DVC hash pulled
    notes: list[str] = field(default_factory=list)  # how the rebuild differs (code, schedule)

    def differences(self) -> dict[str, dict[str, float]]:
        """rebuilt − registered per lesion type and metric (NaN where either is undefined)."""
        return {name: {m: self.rebuilt[name][m] - row[m] for m in METRICS if m in row}
                for name, row in self.registered.items() if name in self.rebuilt}

    def largest_difference(self) -> float:
        gaps = [abs(v) for row in self.differences().values() for v in row.values()]
        return max((g for g in gaps if math.isfinite(g)), default=0.0)


def stored_params(name: str, version: str, here: Params) -> Params:
    """The version's params, with ``here``'s runtime (where the tracking server and the DVC
    remote are now): where things run does not change results."""
    raw = registry.version_artifact(name, version, PARAMS_ARTIFACT)
    if raw is None:
        raise ReproduceError(f"{name} v{version} was registered without its params ({PARAMS_ARTIFACT}); "
                             "only versions registered by this release can be reproduced")
    raw.update(runtime=here.runtime.model_dump(), cluster=here.cluster.model_dump())
    return config.validate(raw)


def code_notes(tags: dict[str, str]) -> list[str]:
    """What makes the code that runs now differ from the code that trained the version."""
    commit, dirty = code_version(package_dir())
    notes = []
    if tags.get(TAG_GIT_COMMIT) != commit:
        notes.append(f"registered at commit {tags.get(TAG_GIT_COMMIT)}, running {commit}")
    if tags.get(TAG_GIT_DIRTY) == "true":
        notes.append("the registered version was trained from uncommitted changes")
    if dirty:
        notes.append("this checkout has uncommitted changes")
    return notes


def training_as_registered(params: Params, tags: dict[str, str]) -> tuple[Params, list[str]]:
    """``params`` with the decisions the training machine made, not new ones by this machine:
    when ``train.max_minutes`` ended the version's schedule early, that many epochs and no time
    limit (a schedule planned for them from the start ramps and anneals a little differently from
    the shortened one, so the note says so); and the precision ``train.precision: auto`` chose
    there (bf16 where the CPU had bf16 units), which this machine might not."""
    notes = []
    epochs = tags.get(TAG_TRAINED_EPOCHS, NONE)
    if epochs != NONE:
        notes.append(f"train.max_minutes ended its schedule after {epochs} of {params.train.epochs} epochs: "
                     f"rebuilt with {epochs} epochs and no time limit")
        params = params.with_section("train", epochs=int(epochs), max_minutes=None)
    precision = tags.get(TAG_TRAINED_PRECISION, NONE)
    if precision != NONE and params.train.precision != precision:
        notes.append(f"train.precision {params.train.precision} resolved to {precision} where it trained: "
                     f"rebuilt in {precision}")
        params = params.with_section("train", precision=precision)
    return params, notes


def reproduce(here: Params, version: str) -> Reproduction:
    """Retrain ``version`` from its lineage and score it like the registered one was scored."""
    name = here.runtime.model_name
    version = registry.resolve(name, version)
    tags = registry.version_info(name, version)["tags"]
    params = stored_params(name, version, here)
    registered = registry.version_artifact(name, version, EVALUATION_ARTIFACT)
    missing = [t for t in (TAG_DATASET_MD5, TAG_PSEUDO_DATASET_MD5) if tags.get(t, NONE) == NONE]
    if registered is None or missing:
        raise ReproduceError(f"{name} v{version} lacks {missing or EVALUATION_ARTIFACT}: its lineage "
                             "cannot rebuild it")
    warm = tags.get(TAG_INIT_FROM_VERSION, NONE)
    # the parent's weights, not whatever is champion today
    params = params.with_section("train", init_from=None if warm == NONE else warm)
    if TAG_SERVED_PRECISION not in tags:  # registered before int8 exports: it served its float graph
        params = params.with_section("evaluate", int8=False)
    params, training_notes = training_as_registered(params, tags)
    notes = code_notes(tags) + training_notes
    datasets = {"trained on": tags[TAG_PSEUDO_DATASET_MD5], "evaluated on": tags[TAG_DATASET_MD5]}
    runtime = params.runtime
    with tempfile.TemporaryDirectory(prefix="lesionflow-reproduce-") as tmp:
        tmp = Path(tmp)
        train_dir, eval_dir = (restore_dataset(md5, tmp / role.split()[0], remote=runtime.remote(),
                                               endpoint_url=runtime.s3_endpoint_url,
                                               retry_seconds=runtime.service_wait_seconds)
                               for role, md5 in datasets.items())
        experiment = tracking.experiment_id(f"{name}-reproduce")
        with mlflow.start_run(experiment_id=experiment, run_name=f"reproduce v{version}",
                              tags={TAG_REPRODUCES: version}):
            meta_train_step.run(params, train_dir, tmp / "model")
            manifest = read_manifest(eval_dir)
            # scored as the evaluate step scored the version: through the export it serves
            served, _ = served_predictor(params, load_model(tmp / "model"), eval_dir, manifest, tmp / "onnx")
            rebuilt = score_model(served, eval_dir, select(manifest, registered["split"]),
                                  params.evaluate.threshold)
            mlflow.log_dict({"registered": registered["table"], "rebuilt": rebuilt.table},
                            "reproduction.json")
    return Reproduction(version, registered["split"], registered["table"], rebuilt.table, datasets, notes)
