"""Method comparisons declared in YAML (``experiments/*.yaml``), run over seeds, logged to MLflow,
reported as a table the README is generated from (issue 16).

An experiment file names a ``kind`` (what one arm run does, ``KINDS``), a dataset, the seeds, the
overrides every arm shares (the same budget: epochs, image size, batch, schedule) and the arms —
each its own overrides plus what the kind reads (e.g. ``labels: weak``, ``noise: 0.05``). Arms
sharing a ``group`` are compared with each other: within a group the arm with the best mean
validation Dice is the one chosen; the test split is scored for every run but chooses nothing.

    python bench/experiment.py run experiments/weak-kvasir.yaml [--seeds 0 1] [--arms full weak]
    python bench/experiment.py report experiments/weak-kvasir.yaml [--readme] [--plot F.png]

``run`` logs one MLflow run per (arm, seed), tagged with the experiment's name and the run's key —
a digest of the dataset, the resolved params, what the kind reads from the arm, the seed and the
package code —
and skips a pair whose key already has a finished run or that another process is running (a file
lock per key in the cache), so it resumes after a crash, and processes started side by side (one
per core, ``taskset``) share out the pairs; on one MLflow server
(``--set runtime.mlflow_tracking_uri=http://…``) their runs land in one place.
``report`` reads the finished runs with the current keys (a changed arm or package re-runs, never
mixes), logs a summary run holding the table, ``results.json`` and the plot with the arm runs
nested under it, and with ``--readme`` rewrites the README block between
``<!-- experiment:NAME -->`` and ``<!-- /experiment:NAME -->``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from filelock import FileLock, Timeout

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.meta_arms import run_arm as meta_arm  # noqa: E402
from bench.model_bench import run_arm as supervised_arm  # noqa: E402
from bench.video_propagation import run_arm as propagation_arm  # noqa: E402
from bench.weak_vs_full import run_arm as weak_arm  # noqa: E402
from lesionflow import tracking  # noqa: E402

KINDS = {"weak": weak_arm, "propagation": propagation_arm, "meta": meta_arm, "supervised": supervised_arm}  # kind → run_arm(params, dataset dir, arm spec, seed, cache) → metrics
ARM_BOOKKEEPING = ("set", "group", "label", "baseline")  # an arm's keys the kind does not read


def arm_reads(arm: dict) -> dict:
    """What the kind reads from an arm (``labels``, ``noise``, ``method``, …)."""
    return {k: v for k, v in arm.items() if k not in ARM_BOOKKEEPING}


def load_spec(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    missing = {"name", "kind", "dataset", "seeds", "arms"} - set(spec)
    if missing:
        raise SystemExit(f"{path}: missing {sorted(missing)}")
    if spec["kind"] not in KINDS:
        raise SystemExit(f"{path}: kind {spec['kind']!r} is not one of {sorted(KINDS)}")
    for name, arm in spec["arms"].items():
        arm.setdefault("set", [])
        arm.setdefault("group", "")
        if arm.get("baseline") and arm["baseline"] not in spec["arms"]:
            raise SystemExit(f"{path}: arm {name}'s baseline {arm['baseline']!r} is not an arm")
    return spec


def arm_params(spec: dict, arm: dict, cache: Path, overrides: list[str]):
    return harness.load_params(spec["dataset"], cache, f"experiment-{spec['name']}",
                               [*spec.get("set", []), *arm["set"], *overrides])


def run_key(spec: dict, arm: dict, params, seed: int, dataset_key: str, code: str) -> str:
    """Everything that changes a run's result: the resolved params (where things live aside: the
    dataset key stands for the data), what the kind reads from the arm, the seed, the dataset and
    the package code."""
    return harness.digest(spec["kind"], harness.params_that_matter(params), arm_reads(arm), seed, dataset_key, code)


def finished_runs(spec: dict) -> list:
    return mlflow.search_runs(filter_string=f"tags.experiment = '{spec['name']}' and attributes.status = 'FINISHED'",
                              output_format="list", search_all_experiments=True)


def run(spec: dict, args) -> None:
    cache = args.cache.resolve()
    torch.set_num_threads(args.threads)
    code = harness.package_code()
    seeds = args.seeds if args.seeds is not None else spec["seeds"]
    arms = args.arms or list(spec["arms"])
    (cache / "claims").mkdir(parents=True, exist_ok=True)
    # resolved once, at start: an edit to params.yaml or configs/ during a long run must not
    # change (or break) the pairs still to come
    resolved = {name: arm_params(spec, spec["arms"][name], cache, args.set) for name in arms}
    with FileLock(cache / "mlflow.lock"):  # side by side on a new store: one creates its tables
        tracking.connect(resolved[arms[0]])
    for seed in seeds:
        for name in arms:
            arm, params = spec["arms"][name], resolved[name]
            dataset, dataset_key = harness.cached_dataset(params, cache)
            key = run_key(spec, arm, params, seed, dataset_key, code)
            # a pair being run by another process on this cache holds its lock: skip it (the
            # lock is the OS's, so a killed process frees it and the pair runs again later)
            lock = FileLock(cache / "claims" / f"{key}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                print(f"{name} seed {seed}: being run by another process", flush=True)
                continue
            try:
                if key in {r.data.tags.get("key") for r in finished_runs(spec)}:
                    print(f"{name} seed {seed}: already run (key {key})", flush=True)
                    continue
                t0 = time.monotonic()
                with mlflow.start_run(run_name=f"{spec['name']}: {name} seed {seed}"):
                    mlflow.set_tags({"experiment": spec["name"], "arm": name, "seed": str(seed), "key": key,
                                     "code": code, "group": arm["group"]})
                    mlflow.log_params({"overrides": " ".join([*spec.get("set", []), *arm["set"]])[:6000],
                                       **{k: v for k, v in arm.items() if k not in ("set", "group", "label")}})
                    metrics = KINDS[spec["kind"]](params, dataset, arm, seed, cache)
                    mlflow.log_metrics({**metrics, "minutes": (time.monotonic() - t0) / 60})
            finally:
                lock.release()
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                  + f" ({(time.monotonic() - t0) / 60:.1f} min)", flush=True)


def collect(spec: dict, cache: Path, overrides: list[str]) -> dict:
    """The finished runs of the spec's arms and seeds whose key matches the current code."""
    code = harness.package_code()
    by_key = {r.data.tags["key"]: r for r in finished_runs(spec)}
    results: dict = {"name": spec["name"], "arms": {}, "seeds": spec["seeds"], "code": code}
    for name, arm in spec["arms"].items():
        params = arm_params(spec, arm, cache, overrides)
        data = harness.dataset_key(params)
        rows = {}
        for seed in spec["seeds"]:
            found = by_key.get(run_key(spec, arm, params, seed, data, code))
            if found is not None:
                rows[seed] = {**found.data.metrics, "run_id": found.info.run_id}
        results["arms"][name] = {"label": arm.get("label", name), "group": arm["group"],
                                 "baseline": arm.get("baseline"), "runs": rows}
    return results


def chosen_arms(results: dict) -> set[str]:
    """Per group, the arm with the best mean validation Dice over its seeds."""
    best: dict[str, tuple[float, str]] = {}
    for name, arm in results["arms"].items():
        if arm["runs"] and arm["group"]:
            score = float(np.mean([r["val_dice"] for r in arm["runs"].values()]))
            if arm["group"] not in best or score > best[arm["group"]][0]:
                best[arm["group"]] = (score, name)
    return {name for _, name in best.values()}


def table(results: dict, spec: dict) -> str:
    if not any(arm["runs"] for arm in results["arms"].values()):
        return f"No finished runs of `{results['name']}` for the current code yet (`bench/experiment.py run` makes them)."
    extra = spec.get("columns", {})  # metric → column header, besides val/test Dice
    header = ["arm", "seeds", "val Dice", "val Dice − baseline (same seed)", "test Dice", "test Dice / baseline",
              *extra.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    chosen = chosen_arms(results)
    for name, arm in results["arms"].items():
        runs = arm["runs"]
        if not runs:
            continue
        base = results["arms"].get(arm["baseline"] or "", {}).get("runs", {})
        # paired by seed: the seeds' shared part of the variance drops out of a gap
        gaps = [r["val_dice"] - base[s]["val_dice"] for s, r in runs.items() if s in base]
        ratios = [r["test_dice"] / base[s]["test_dice"] for s, r in runs.items() if s in base]
        cells = [f"**{arm['label']}** (chosen on val)" if name in chosen else arm["label"], str(len(runs)),
                 harness.spread([r["val_dice"] for r in runs.values()]),
                 harness.spread(gaps, "+.4f") if gaps else "–",
                 harness.spread([r["test_dice"] for r in runs.values()]),
                 harness.spread(ratios) if ratios else "–"]
        for metric in extra:
            values = [r[metric] for r in runs.values() if metric in r]
            cells.append(harness.spread(values) if values else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in results["arms"].values() if a["runs"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(arms)), 4), dpi=120)
    for x, arm in enumerate(arms):
        for split, colour, dx in (("val_dice", "tab:grey", -0.15), ("test_dice", "tab:blue", 0.15)):
            values = [r[split] for r in arm["runs"].values()]
            ax.bar(x + dx, np.mean(values), 0.3, color=colour, alpha=0.6,
                   label=split.replace("_dice", " Dice") if x == 0 else None)
            ax.scatter([x + dx] * len(values), values, color=colour, s=10, zorder=3)
    ax.set_xticks(range(len(arms)), [a["label"] for a in arms], rotation=25, ha="right", fontsize=8)
    ax.set(ylabel="Dice (bars: mean; dots: seeds)", title=results["name"])
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_readme_block(name: str, text: str, readme: Path = REPO / "README.md") -> None:
    begin, end = f"<!-- experiment:{name} -->", f"<!-- /experiment:{name} -->"
    content = readme.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"README.md has no {begin} … {end} block to fill")
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", content))


def report(spec: dict, args) -> None:
    cache = args.cache.resolve()
    params = arm_params(spec, next(iter(spec["arms"].values())), cache, args.set)
    tracking.connect(params)
    results = collect(spec, cache, args.set)
    text = table(results, spec)
    with mlflow.start_run(run_name=f"{spec['name']}: summary") as parent:
        mlflow.set_tags({"experiment_summary": spec["name"]})
        harness.nest_under(parent.info.run_id,
                           [row["run_id"] for arm in results["arms"].values() for row in arm["runs"].values()])
        harness.log_report(text, "table.md", results, args.plot, plot)
    print(text)
    print(f"MLflow summary run {parent.info.run_id} (the arm runs nested under it)")
    if args.readme:
        write_readme_block(spec["name"], text)
        print(f"README.md: block experiment:{spec['name']} rewritten")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run: only these seeds")
    parser.add_argument("--arms", nargs="+", default=None, help="run: only these arms")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="runtime.key=value: where things live "
                        "(e.g. runtime.mlflow_tracking_uri), not part of the run key")
    parser.add_argument("--cache", type=Path, default=REPO / ".lesionflow" / "experiments")
    parser.add_argument("--readme", action="store_true", help="report: rewrite the README block")
    parser.add_argument("--plot", type=Path, default=None, help="report: write the plot here (PNG)")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    if any(not o.startswith("runtime.") for o in args.set):
        raise SystemExit("--set takes runtime.* only (where things live); put what changes results in the spec")
    unknown = sorted(set(args.arms or []) - set(spec["arms"]))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; the spec has {list(spec['arms'])}")
    (run if args.command == "run" else report)(spec, args)


if __name__ == "__main__":
    main()
