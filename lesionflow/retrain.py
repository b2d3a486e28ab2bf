"""Retrain when reviewers have corrected enough: what the schedule (a CronJob) runs.

The count is of corrections the last training *attempt* has not seen: those in the newest
corrections version that the newest registered version's corrections (a lineage tag) did not
hold. Refused candidates are registered versions too, so a candidate the gate kept out does not
make every later tick retrain on the same corrections again. The run it starts trains on exactly
that newest version and goes through the usual promotion gate, so a worse model never replaces
the champion; while another run holds the model's training lease, nothing starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from lesionflow import corrections, lease, lineage, registry
from lesionflow.config import Params
from lesionflow.steps.entrypoints import PIPELINE_LEASE


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
    holder = lease.current(name, PIPELINE_LEASE)
    if holder is not None:
        return RetrainDecision(False, 0, f"another training run holds the lease of {name}: {holder}",
                               newest.md5)
    attempt = registry.newest_version(name)
    seen = (registry.version_info(name, attempt)["tags"].get(lineage.TAG_CORRECTIONS_MD5)
            if attempt else None)
    new = corrections.count_new(params, newest, seen)
    trained = f"the last attempt v{attempt}" if attempt else "no model yet"
    if new < min_corrections:
        return RetrainDecision(False, new, f"{new} new correction(s) since {trained}; "
                               f"need at least {min_corrections}", newest.md5)
    return RetrainDecision(True, new, f"{new} new correction(s) since {trained} "
                           f"(threshold {min_corrections})", newest.md5)


def pinned(params: Params, decision: RetrainDecision) -> Params:
    """The run trains on the corrections version the decision counted, even if more arrive."""
    return params.with_section("corrections", dataset=decision.corrections_md5)
