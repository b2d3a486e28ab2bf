"""Lineage: every tag and artifact name that ties a registered version to what made it, in one place.

A version is rebuilt from these alone (``lesionflow reproduce``): the DVC hashes of the datasets it
was trained and evaluated on, the full resolved params (an artifact, not only their hash), the code
version and whether the tree was dirty, the parent version, and the version of every model that
labelled its training data (the labelling champion, the next-frame model G, the weak-label GCN).

Inside a pipeline run, lineage travels from step to step as one JSON mapping keyed by the ``TAG_*``
names below: each step adds what it produced, and the register step puts the whole mapping on the
version. Tag values are strings; ``NONE`` marks "not used in this run".
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

NONE = "none"
_PREFIX = "lesionflow."

# --- on registered versions (and their runs) ---------------------------------------------------
TAG_DATASET_MD5 = _PREFIX + "dataset_md5"  # the ingested dataset: evaluated on its test split
TAG_CORRECTIONS_MD5 = _PREFIX + "corrections_md5"  # reviewer corrections merged into train
TAG_AUGMENTED_DATASET_MD5 = _PREFIX + "augmented_dataset_md5"  # after synthesize_video
TAG_PSEUDO_DATASET_MD5 = _PREFIX + "pseudo_dataset_md5"  # after pseudo_label: what trained
TAG_LABELLER_VERSION = _PREFIX + "labeller_version"  # "<model>@<version>" that pseudo-labelled
TAG_VIDEO_MODEL = _PREFIX + "video_model"  # runs:/<id>/video_model: G (propagation, synthesis)
TAG_WEAK_MODEL = _PREFIX + "weak_model"  # runs:/<id>/weak_model: the area-ratio GCN
TAG_INIT_FROM_VERSION = _PREFIX + "init_from_version"  # warm start: weights trained further
# plain training's epochs when train.max_minutes ended the schedule early ("none": all of train.epochs)
TAG_TRAINED_EPOCHS = _PREFIX + "trained_epochs"
# what plain training's forward pass ran in, bf16 | fp32: train.precision "auto" depends on the CPU
TAG_TRAINED_PRECISION = _PREFIX + "trained_precision"
TAG_GIT_COMMIT = _PREFIX + "git_commit"
TAG_GIT_DIRTY = _PREFIX + "git_dirty"  # "true" when the code had uncommitted changes
TAG_PARAMS_HASH = _PREFIX + "params_hash"
TAG_PIPELINE_RUN_ID = _PREFIX + "pipeline_run_id"
TAG_PARENT_VERSION = _PREFIX + "parent_version"  # the champion when this version was registered
METRIC_TAG_PREFIX = _PREFIX + "metric."

# the dataset versions of one pipeline run, by role: each tag names exactly one of them
DATASET_TAGS = {"ingested": TAG_DATASET_MD5, "augmented": TAG_AUGMENTED_DATASET_MD5,
                "trained_on": TAG_PSEUDO_DATASET_MD5}
# what a pipeline step may add to the lineage it passes on
STEP_KEYS = (TAG_DATASET_MD5, TAG_CORRECTIONS_MD5, TAG_AUGMENTED_DATASET_MD5, TAG_PSEUDO_DATASET_MD5,
             TAG_LABELLER_VERSION, TAG_VIDEO_MODEL, TAG_WEAK_MODEL, TAG_INIT_FROM_VERSION, TAG_TRAINED_EPOCHS,
             TAG_TRAINED_PRECISION)
KEYS = STEP_KEYS + (TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_PARAMS_HASH, TAG_PIPELINE_RUN_ID,
                    TAG_PARENT_VERSION)
# The caller must know these; the code version and the parent version can be found out here.
REQUIRED = (TAG_DATASET_MD5, TAG_PARAMS_HASH, TAG_PIPELINE_RUN_ID)

# --- on runs -----------------------------------------------------------------------------------
TAG_STEP = _PREFIX + "step"
TAG_GATE = _PREFIX + "gate"  # promoted | refused
TAG_GATE_REASON = _PREFIX + "gate_reason"
TAG_GATE_N = _PREFIX + "gate_n"  # test records both models were compared on
TAG_GATE_RECORD_SET = _PREFIX + "gate_record_set"  # hash of those records (ids + content)
TAG_COMPARED_WITH = _PREFIX + "compared_with_champion"
TAG_SERVED_PRECISION = _PREFIX + "served_precision"  # the stored ONNX graph's: int8 | float32
# on versions: pending from creation until every alias move of the register step is done;
# interrupted when a later register found it pending with no gate decision applied (run killed)
TAG_REGISTRATION = _PREFIX + "registration"
REGISTRATION_PENDING, REGISTRATION_COMPLETE, REGISTRATION_INTERRUPTED = "pending", "complete", "interrupted"
TAG_REPRODUCES = _PREFIX + "reproduces"  # a `lesionflow reproduce` run: the version it rebuilds
# on corrections versions (runs of <model>-corrections)
TAG_N_CORRECTIONS = _PREFIX + "n_corrections"
TAG_N_ADDED = _PREFIX + "n_added"  # corrections the batch behind this version added
TAG_SOURCE = _PREFIX + "source"  # where that batch came from
TAG_REVIEWER = _PREFIX + "reviewer"

# --- artifacts on a registered version's run ---------------------------------------------------
PARAMS_ARTIFACT = "lineage/params.json"  # the full resolved params (runtime included)
RECORDS_ARTIFACT = "lineage/records.json"  # ids + content hashes trained and selected on
EVALUATION_ARTIFACT = "lineage/evaluation.json"  # per-type test metrics at registration
GATE_ARTIFACT = "lineage/gate.json"  # the full gate record
RECORDS_FILE = "records.json"  # the same record list, next to the weights in a model artifact


def merged(lineage_json: str, **added: str | None) -> str:
    """``lineage_json`` (``""`` at the first step) plus ``added`` (keys are ``TAG_*`` names
    without the prefix, e.g. ``dataset_md5``; ``None`` values become ``NONE``), as JSON."""
    lineage = json.loads(lineage_json) if lineage_json else {}
    for key, value in added.items():
        tag = _PREFIX + key
        if tag not in STEP_KEYS:
            raise KeyError(f"{tag!r} is not a step lineage key; keys are {STEP_KEYS}")
        lineage[tag] = NONE if value is None else str(value)
    return json.dumps(lineage, sort_keys=True)


def code_version(repo_dir: str | os.PathLike | None = None) -> tuple[str, bool]:
    """(commit, dirty): HEAD of the checkout and whether tracked files differ from it, else the
    SHA baked into the image (an image is built from a clean tree), else ("unknown", False)."""
    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "HEAD")
    if head is not None and head.returncode == 0 and head.stdout.strip():
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), bool(status is None or status.returncode or status.stdout.strip())
    return os.environ.get("LESIONFLOW_GIT_SHA") or "unknown", False


def package_dir() -> Path:
    """The code that runs, not whatever directory a step happens to be started in."""
    return Path(__file__).parent
