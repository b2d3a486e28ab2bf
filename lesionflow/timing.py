"""Opt-in phase timestamps of ``lesionflow run`` and its step processes, for
``bench/pipeline_bench.py``: where a step's start-up goes, next to its compute.

With ``LESIONFLOW_TIMING_LOG`` set, ``mark(phase)`` appends one JSON line to that file: the
process's step, the phase that just *ended* and when (wall clock, comparable across processes).
Unset (always, outside the bench), a mark costs one environment lookup. Stdlib only, and imported
before anything heavy: when it loads, the interpreter and the kfp executor have started.
"""

from __future__ import annotations

import json
import os
import time

ENV = "LESIONFLOW_TIMING_LOG"
_LOADED = time.time()
_step = "?"


def begin(step: str) -> None:
    """Name this process's step and log its start-up: from process creation to this module's
    import ("start-up": python, kfp executor, component), then to now ("imports")."""
    global _step
    _step = step
    if os.environ.get(ENV):
        _write("process start", _process_created())
        _write("start-up", _LOADED)
        mark("imports")


def mark(phase: str) -> None:
    if os.environ.get(ENV):
        _write(phase, time.time())


def _process_created() -> float:
    """Wall-clock creation time of this process, to ~10 ms (psutil's can be a second off: it
    adds the boot time, which /proc/stat rounds to whole seconds). Linux; elsewhere, import time."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    except OSError:
        return _LOADED
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def _write(phase: str, t: float) -> None:
    with open(os.environ[ENV], "a") as log:  # one short append: lines of processes never interleave
        log.write(json.dumps({"step": _step, "phase": phase, "t": t}) + "\n")
