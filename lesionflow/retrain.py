"""Retrain when reviewers have corrected enough: what the schedule (a CronJob) runs.

The count is of corrections the current champion has never seen: those in the newest corrections
version that the champion's own corrections version (a lineage tag) did not hold. The run it
starts trains on exactly that newest version and goes through the usual promotion gate, so a
worse model never replaces the champion.
"""

from __future__ import annotations

from dataclasses import dataclass

from lesionflow import corrections, registry
from lesionflow.config import Params


@dataclass(frozen=True)
class RetrainDecision:
    start: bool
    new_corrections: int
    reason: str
    corrections_md5: str | None = None


def decide(params: Params, min_corrections: int) -> RetrainDecision:
    name = params.runtime.model_name
    newest = corrections.latest(params)
    if newest is None:
        return RetrainDecision(False, 0, f"no corrections recorded for {name} yet")
    champion = registry.champion_version(name)
    seen = (registry.version_info(name, champion)["tags"].get(registry.TAG_CORRECTIONS_MD5)
            if champion else None)
    new = corrections.count_new(params, newest, seen)
    trained = f"champion v{champion}" if champion else "no champion yet"
    if new < min_corrections:
        return RetrainDecision(False, new, f"{new} new correction(s) since {trained}; "
                               f"need at least {min_corrections}", newest.md5)
    return RetrainDecision(True, new, f"{new} new correction(s) since {trained} "
                           f"(threshold {min_corrections})", newest.md5)


def pinned(params: Params, decision: RetrainDecision) -> Params:
    """The run trains on the corrections version the decision counted, even if more arrive."""
    pinned_corrections = params.corrections.model_copy(update={"dataset": decision.corrections_md5})
    return params.model_copy(update={"corrections": pinned_corrections})
