"""Model registry: versions with lineage, a promotion gate, aliases with an audited history, rollback.

Everything lives in the MLflow tracking server (not on a local disk), so the same calls work from a
laptop against `sqlite:///` and from a KFP pod against the cluster's server. Aliases only — MLflow
stages are deprecated. MLflow keeps no record of alias moves, so every move is also written as a
finished run in the experiment ``<model>-alias-history``: readable in the UI, never edited, and the
source of truth for "what was champion before".
"""

from __future__ import annotations

import getpass
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import torch
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import get_model_info

from lesionflow import tracking
from lesionflow.errors import RegistryError
from lesionflow.lineage import (
    KEYS,
    METRIC_TAG_PREFIX,
    NONE,
    REGISTRATION_COMPLETE,
    REGISTRATION_INTERRUPTED,
    REGISTRATION_PENDING,
    REQUIRED,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_PARENT_VERSION,
    TAG_REGISTRATION,
    code_version,
    package_dir,
)
from lesionflow.models import runtime
from lesionflow.models.pyfunc import (
    DEFAULT_THRESHOLD,
    SIGNATURE,
    WEIGHTS,
    SegmentationModel,
)
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import save_model

CHAMPION = "champion"
Action = Literal["promote", "rollback", "set"]  # "refuse" is recorded, but moves nothing
ACTIONS = get_args(Action)


def _client() -> MlflowClient:
    # Built per call so it follows whatever tracking URI is current.
    return MlflowClient()


def _pip_requirements() -> list[str]:
    # Explicit pins: MLflow's requirement inference costs ~5 s per logged model. The local label
    # ("+cpu") is dropped so the pin stays installable from PyPI.
    from importlib.metadata import version

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"cloudpickle=={version('cloudpickle')}",
        f"mlflow=={mlflow.__version__}",
        f"pycocotools=={version('pycocotools')}",
        f"onnxruntime=={version('onnxruntime')}",
    ]


def _versions(name: str) -> list[str]:
    found = _client().search_model_versions(f"name = '{name}'")
    return sorted((str(mv.version) for mv in found), key=int)


def _check_version(name: str, version: str) -> None:
    try:
        _client().get_model_version(name, str(version))
    except MlflowException as e:
        existing = _versions(name)
        raise RegistryError(
            f"model {name!r} has no version {version!r}; existing versions: "
            f"{', '.join(existing) if existing else 'none'}"
        ) from e


def newest_version(name: str) -> str | None:
    """The most recently registered version (promoted or refused), or None."""
    versions = _versions(name)
    return versions[-1] if versions else None


def champion_version(name: str) -> str | None:
    """The version the ``champion`` alias points at, or None (no alias or no such model yet)."""
    return _alias_version(name, CHAMPION)


def _alias_version(name: str, alias: str) -> str | None:
    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def register_model(
    model: Segmenter | LesionTypeRouter, *, name: str, lineage: dict[str, str],
    metrics: dict[str, float], threshold: float = DEFAULT_THRESHOLD,
    artifacts: dict[str, object] | None = None, decision_tags: dict[str, str] | None = None,
    key_params: dict[str, str] | None = None, onnx_dir: Path | None = None,
) -> str:
    """Log ``model`` in the active run as a pyfunc and register it as a new version of ``name``.

    The logged model is ``SegmentationModel`` (pre/post-processing and routing inside, mask
    ``threshold`` in its config, ``pyfunc.SIGNATURE``) over the weights folder of
    ``store.save_model`` — weights and hyper-parameters, not a pickle of the module, so renaming
    code never breaks a stored version — and the ONNX export it serves through: ``onnx_dir``, the
    one the evaluate step scored (int8 where validation allowed), else ``runtime.save``'s float one.
    Lineage and metrics go on the version (what the registry UI and the gate read) and on the run
    (what the experiment UI shows). ``lineage`` is keyed by ``lesionflow.lineage`` tag names; the
    code version (commit + dirty flag) and the parent version (the champion right now, or "none")
    are filled in when absent. ``artifacts`` (path → JSON-able content, e.g. the resolved params)
    are logged on the run first: a version is only created, with all its tags in the same call,
    once everything it refers to is stored. ``decision_tags`` (the gate's) go on with them, so a
    killed process never leaves a version without its lineage or its gate record. ``key_params`` go
    on the logged model, so its page lists them. Returns the new version number as a string.
    """
    run = mlflow.active_run()
    if run is None:
        raise RegistryError("register_model must be called inside an active MLflow run")
    unknown = sorted(set(lineage) - set(KEYS))
    missing = [k for k in REQUIRED if not lineage.get(k)]
    if unknown or missing:
        raise RegistryError(
            f"lineage for {name!r}: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
            f"keys are {list(KEYS)}"
        )
    commit, dirty = code_version(package_dir())
    tags = {
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: str(dirty).lower(),
        TAG_PARENT_VERSION: champion_version(name) or NONE,
        **{k: str(v) for k, v in lineage.items()},
        **{METRIC_TAG_PREFIX + k: repr(float(v)) for k, v in metrics.items()},
        **(decision_tags or {}),
    }
    for path, content in (artifacts or {}).items():
        mlflow.log_text(json.dumps(content, indent=1, sort_keys=True), path)
    with tempfile.TemporaryDirectory(prefix="lesionflow-register-") as tmp:
        save_model(model, Path(tmp) / WEIGHTS)
        if onnx_dir is not None:
            shutil.copytree(onnx_dir, Path(tmp) / runtime.ONNX)
        else:
            runtime.save(model, Path(tmp) / runtime.ONNX)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=SegmentationModel(),
            artifacts={WEIGHTS: str(Path(tmp) / WEIGHTS), runtime.ONNX: str(Path(tmp) / runtime.ONNX)},
            model_config={"threshold": float(threshold)}, signature=SIGNATURE,
            pip_requirements=_pip_requirements(), params=key_params,
        )
    mlflow.set_tags({k: v for k, v in tags.items() if k != TAG_REGISTRATION})  # a run never changes state
    mv = mlflow.register_model(info.model_uri, name, tags=tags)
    return str(mv.version)


def version_artifact(name: str, version: str, path: str) -> dict | None:
    """A JSON artifact of ``version``'s run (``lineage.*_ARTIFACT``), or None if it has none
    (versions registered before it was stored)."""
    run_id = version_info(name, version)["run_id"]
    try:
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))
    except (MlflowException, OSError):
        return None


def version_info(name: str, version: str) -> dict:
    """What the CLI shows for one version: aliases, source run, creation time and all its tags."""
    _check_version(name, version)
    mv = _client().get_model_version(name, str(version))
    return {
        "name": name,
        "version": str(mv.version),
        "aliases": list(mv.aliases),
        "run_id": mv.run_id,
        "source": mv.source,
        "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(),
        "tags": dict(mv.tags),
    }


def version_metrics(name: str, version: str) -> dict[str, float]:
    """The metrics recorded at registration, e.g. to feed the champion's side of the gate."""
    tags = version_info(name, version)["tags"]
    return {k[len(METRIC_TAG_PREFIX):]: float(v) for k, v in tags.items() if k.startswith(METRIC_TAG_PREFIX)}


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str  # one line: why promoted, or every reason for refusing
    candidate: float  # the gate metric over all compared records
    champion: float | None
    refusals: tuple[str, ...] = ()


def gate(
    candidate: dict[str, dict[str, float]],
    champion: dict[str, dict[str, float]] | None,
    metric: str = "dice",
    tolerance: float = 0.01,
    max_type_drop: float = math.inf,
    min_type_records: int = 1,
    max_temporal_drop: float | None = None,
) -> GateDecision:
    """Promote unless the candidate is worse than the champion by more than ``tolerance`` overall,
    or by more than ``max_type_drop`` on any lesion type with at least ``min_type_records``
    compared records (seed 003: a model better on average but worse on one lesion type is not
    better for the patients with that type). Both tables are per-type (``"overall"`` plus one row
    per lesion type) over the same records. The tolerances keep retrains on fresh data (whose
    score wobbles) from being refused for noise. With ``max_temporal_drop`` set, a candidate whose
    overall ``temporal_dice`` (video frames: Dice of consecutive predicted masks) is below the
    champion's by more than it is refused too: a flickering model is worse to watch even at an equal
    Dice. A champion table without the figure (stills, or a version older than the metric) is not
    checked.
    """
    if metric not in candidate.get("overall", {}):
        raise RegistryError(f"gate metric {metric!r} missing from candidate metrics {sorted(candidate.get('overall', {}))}")
    cand = float(candidate["overall"][metric])
    if champion is None:
        return GateDecision(True, f"no champion yet; candidate {metric}={cand:.4f} promoted", cand, None)
    if metric not in champion.get("overall", {}):
        raise RegistryError(f"gate metric {metric!r} missing from champion metrics {sorted(champion.get('overall', {}))}")
    champ = float(champion["overall"][metric])
    floor = champ - tolerance
    refusals = []
    if cand < floor:
        refusals.append(f"candidate {metric}={cand:.4f} < champion {champ:.4f} - tolerance {tolerance:.4f} = {floor:.4f}")
    for lesion_type in sorted(set(candidate) & set(champion) - {"overall"}):
        n = int(champion[lesion_type]["n"])
        c, h = float(candidate[lesion_type][metric]), float(champion[lesion_type][metric])
        if n >= min_type_records and c < h - max_type_drop:
            refusals.append(f"{lesion_type}: candidate {metric}={c:.4f} < champion {h:.4f} - "
                            f"max_type_drop {max_type_drop:.4f} (n={n})")
    temporal = (max_temporal_drop is not None and
                all(math.isfinite(t.get("overall", {}).get("temporal_dice", math.nan)) for t in (candidate, champion)))
    if temporal:
        ct, ht = float(candidate["overall"]["temporal_dice"]), float(champion["overall"]["temporal_dice"])
        if ct < ht - max_temporal_drop:
            refusals.append(f"candidate temporal_dice={ct:.4f} < champion {ht:.4f} - max_temporal_drop "
                            f"{max_temporal_drop:.4f}: its masks flicker more between consecutive frames")
    if refusals:
        return GateDecision(False, "; ".join(refusals), cand, champ, tuple(refusals))
    reason = f"candidate {metric}={cand:.4f} >= champion {champ:.4f} - tolerance {tolerance:.4f} = {floor:.4f}"
    if math.isfinite(max_type_drop):
        reason += f"; no lesion type drops more than {max_type_drop:.4f}"
    if temporal:
        reason += f"; temporal_dice drops no more than {max_temporal_drop:.4f}"
    return GateDecision(True, reason, cand, champ)


@dataclass(frozen=True)
class AliasMove:
    model: str
    alias: str
    from_version: str | None
    to_version: str
    who: str
    when: str
    why: str
    action: str
    candidate: str | None = None  # refusals: the version the gate kept out (to_version stays)


_MOVE_FIELDS = ("model", "alias", "from_version", "to_version", "who", "when", "why", "action", "candidate")


def _history_experiment(name: str) -> str:
    return f"{name}-alias-history"


def _who() -> str:
    return os.environ.get("LESIONFLOW_USER") or getpass.getuser()


def _record(move: AliasMove, gate_record: dict | None = None) -> None:
    client = _client()
    exp_id = history_experiment_id(move.model)
    tags = {f: (getattr(move, f) or NONE) for f in _MOVE_FIELDS}
    tags["mlflow.user"] = move.who
    label = (f"refuse v{move.candidate}: {move.alias} stays v{move.to_version}" if move.action == "refuse"
             else f"{move.action} {move.alias}: {move.from_version or NONE} -> {move.to_version}")
    run = client.create_run(exp_id, tags=tags, run_name=label)
    if gate_record is not None:
        client.log_text(run.info.run_id, json.dumps(gate_record, indent=1, sort_keys=True), "gate.json")
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))


def history(name: str, alias: str = CHAMPION) -> list[AliasMove]:
    """Every recorded move of ``alias`` on ``name``, oldest first."""
    client = _client()
    exp = client.get_experiment_by_name(_history_experiment(name))
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.alias = '{alias}'", max_results=50000)
    moves = []
    for r in runs:
        t = r.data.tags
        values = {f: t.get(f, NONE) for f in _MOVE_FIELDS}
        for optional in ("from_version", "candidate"):
            values[optional] = None if values[optional] == NONE else values[optional]
        moves.append(AliasMove(**values))
    # `when` has microseconds in one fixed format, so it sorts as text.
    return sorted(moves, key=lambda m: m.when)


def move_alias(name: str, alias: str, version: str, *, why: str, action: Action,
               gate_record: dict | None = None) -> AliasMove:
    """Point ``alias`` at ``version`` after writing the move (and the gate record behind a
    promotion) to the history, so no move goes unlogged."""
    if action not in ACTIONS:
        raise RegistryError(f"alias action {action!r} must be one of {ACTIONS}")
    version = str(version)
    _check_version(name, version)
    move = AliasMove(
        model=name,
        alias=alias,
        from_version=_alias_version(name, alias),
        to_version=version,
        who=_who(),
        when=datetime.now(UTC).isoformat(timespec="microseconds"),
        why=why,
        action=action,
    )
    _record(move, gate_record)
    _client().set_registered_model_alias(name, alias, version)
    return move


def record_refusal(name: str, candidate: str, *, why: str, gate_record: dict) -> AliasMove:
    """Write a refused promotion to the ``champion`` history: the alias stays where it is, and
    reviewers see the candidate, the reasons and the full gate record next to the real moves."""
    current = champion_version(name)
    move = AliasMove(model=name, alias=CHAMPION, from_version=current, to_version=current or NONE,
                     who=_who(), when=datetime.now(UTC).isoformat(timespec="microseconds"), why=why,
                     action="refuse", candidate=str(candidate))
    _record(move, gate_record)
    return move


def history_experiment_id(name: str) -> str:
    """The alias-history experiment of ``name`` (created if none yet), for links from the UI."""
    return tracking.experiment_id(
        _history_experiment(name),
        tags={"mlflow.note.content": f"Append-only log of alias moves on model {name}."})


def describe_version(name: str, version: str, description: str) -> None:
    """The version page's description (markdown): what reviewers read first."""
    _client().update_model_version(name, str(version), description=description)


def finish_registration(name: str, version: str) -> None:
    """Mark ``version``'s registration complete: its alias moves (and their history) are done."""
    _client().set_model_version_tag(name, str(version), TAG_REGISTRATION, REGISTRATION_COMPLETE)


def recover(name: str) -> list[str]:
    """Repair what a register step killed part-way left behind; returns what was done, for the
    log. Run it under the model's pipeline lease, before registering anew.

    The alias history is written before each alias move, so it works as a write-ahead log: a move
    logged but not applied (the alias still at the move's ``from_version``) is applied now. A
    version still ``pending`` whose gate decision reached the history is marked complete; one whose
    decision never did is not promoted, and its refusal is written to the history as
    ``interrupted``, so reviewers see every registered version accounted for."""
    done = []
    logged = {alias: history(name, alias) for alias in (CHAMPION, "challenger")}
    for alias, entries in logged.items():
        moves = [m for m in entries if m.action != "refuse"]
        current = _alias_version(name, alias)
        if moves and current != moves[-1].to_version and current == moves[-1].from_version:
            _client().set_registered_model_alias(name, alias, moves[-1].to_version)
            done.append(f"completed the interrupted {moves[-1].action} of {alias} "
                        f"{current or NONE} -> v{moves[-1].to_version}")
    pending = _client().search_model_versions(
        f"name = '{name}' and tags.`{TAG_REGISTRATION}` = '{REGISTRATION_PENDING}'")
    decided = {m.candidate if m.action == "refuse" else m.to_version
               for m in logged[CHAMPION] if m.action in ("promote", "refuse")}
    for mv in sorted(pending, key=lambda v: int(v.version)):
        version = str(mv.version)
        if version in decided:
            finish_registration(name, version)
            done.append(f"v{version}: its gate decision was recorded; marked registered")
            continue
        record_refusal(name, version, why="registration interrupted before the gate decision was "
                       "applied (the run was killed); not promoted — a new run registers a new version",
                       gate_record={"decision": "interrupted", "version": version})
        _client().set_model_version_tag(name, version, TAG_REGISTRATION, REGISTRATION_INTERRUPTED)
        done.append(f"v{version}: registration was interrupted before its gate decision; recorded "
                    "as not promoted")
    return done


def _champion_stack(name: str) -> list[str]:
    """Replay champion moves: promote/set push, rollback to X pops back to X (or pushes X if X was
    never on the stack). The top is the champion; the entry below it is what a rollback restores."""
    stack: list[str] = []
    for m in history(name, CHAMPION):
        if m.action == "refuse":
            continue
        if m.action == "rollback" and m.to_version in stack:
            while stack[-1] != m.to_version:
                stack.pop()
        elif not stack or stack[-1] != m.to_version:
            stack.append(m.to_version)
    return stack


def previous_champion(name: str) -> str:
    """The version a plain rollback would restore."""
    stack = _champion_stack(name)
    if len(stack) < 2:
        raise RegistryError("no earlier champion to roll back to")
    return stack[-2]


def rollback(name: str, to_version: str | None = None, why: str = "manual rollback") -> AliasMove:
    """Move ``champion`` back to ``to_version``, or to the previous champion when None.

    Refuses the implicit target when the alias was moved outside this module: the history would then
    not describe what is being rolled back from.
    """
    if to_version is None:
        stack = _champion_stack(name)
        current = champion_version(name)
        if stack and current != stack[-1]:
            raise RegistryError(
                f"champion of {name!r} is v{current} but its alias history ends at v{stack[-1]} "
                f"(moved outside lesionflow); name the version to roll back to"
            )
        to_version = previous_champion(name)
    return move_alias(name, CHAMPION, to_version, why=why, action="rollback")


def resolve(name: str, ref: str) -> str:
    """The version number ``ref`` names: itself if digits, else the version alias ``ref`` points at."""
    ref = str(ref)
    if ref.isdigit():
        _check_version(name, ref)
        return ref
    version = _alias_version(name, ref)
    if version is None:
        try:
            aliases = sorted(_client().get_registered_model(name).aliases)
        except MlflowException:
            raise RegistryError(f"no registered model named {name!r}") from None
        raise RegistryError(
            f"model {name!r} has no alias {ref!r}; existing aliases: {', '.join(aliases) or 'none'}"
        )
    return version


def load_pyfunc(name: str, ref: str) -> SegmentationModel:
    """Version ``ref`` (digits or alias) with its pre/post-processing, on CPU.

    Versions registered before the switch to pyfunc hold a pickled torch module (flavor
    ``pytorch``); they are wrapped in the same ``SegmentationModel`` with the default threshold.
    """
    uri = f"models:/{name}/{resolve(name, ref)}"
    if "pytorch" in get_model_info(uri).flavors:
        return SegmentationModel.wrap(mlflow.pytorch.load_model(uri, map_location="cpu"))
    return mlflow.pyfunc.load_model(uri).unwrap_python_model()


def load_model(name: str, ref: str) -> Segmenter | LesionTypeRouter:
    """The ``Segmenter`` or ``LesionTypeRouter`` of version ``ref`` (digits) or alias ``ref``
    (e.g. ``champion``), for evaluation and pseudo-labelling.

    Loaded on CPU so a model trained on a GPU node still loads on a CPU-only server.
    """
    return load_pyfunc(name, ref).model
