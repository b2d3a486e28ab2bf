"""The experiment harness (bench/experiment.py): specs, run keys, the choice on validation, the
table and the README blocks it generates."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import experiment, harness  # noqa: E402
from tests.conftest import SHARED_DATA, shared_dataset  # noqa: E402

SPECS = sorted((REPO / "experiments").glob("*.yaml"))


def write_spec(tmp_path: Path, **changes) -> Path:
    spec = {"name": "demo", "kind": "weak", "dataset": "kvasir-seg", "seeds": [0, 1],
            "arms": {"full": {"labels": "full"}, "weak": {"labels": "weak", "group": "g", "baseline": "full"}}}
    spec.update(changes)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_loads_with_valid_overrides_and_has_a_readme_block(spec_path, tmp_path):
    spec = experiment.load_spec(spec_path)
    for arm in spec["arms"].values():  # config.load names any unknown key or bad value
        experiment.arm_params(spec, arm, tmp_path, [])
    readme = (REPO / "README.md").read_text()
    assert f"<!-- experiment:{spec['name']} -->" in readme and f"<!-- /experiment:{spec['name']} -->" in readme


def test_spec_errors_are_named(tmp_path):
    with pytest.raises(SystemExit, match="missing"):
        experiment.load_spec(_without(tmp_path, "seeds"))
    with pytest.raises(SystemExit, match="kind 'nope'"):
        experiment.load_spec(write_spec(tmp_path, kind="nope"))
    bad = {"weak": {"labels": "weak", "baseline": "missing"}}
    with pytest.raises(SystemExit, match="baseline 'missing'"):
        experiment.load_spec(write_spec(tmp_path, arms=bad))


def _without(tmp_path: Path, key: str) -> Path:
    path = write_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    del spec[key]
    path.write_text(yaml.safe_dump(spec))
    return path


def test_run_key_changes_with_what_changes_results_only(tmp_path):
    spec = experiment.load_spec(write_spec(tmp_path))
    arm = spec["arms"]["weak"]

    def key(arm=arm, seed=0, data="data", code="code", spec=spec, where=()):
        params = experiment.arm_params(spec, arm, tmp_path, list(where))
        return experiment.run_key(spec, arm, params, seed, data, code)

    base = key()
    assert base == key(arm={**arm, "label": "renamed", "group": "other"})
    assert base == key(where=["runtime.mlflow_tracking_uri=http://elsewhere:5000"])
    assert base == key(arm={**arm, "set": ["ingest.source=/elsewhere/kvasir-seg"]})  # the data key says what it holds
    # an override that restates a default resolves to the same params: the same run
    assert base == key(arm={**arm, "set": ["weak_label.size_weight=0"]})
    assert base != key(arm={**arm, "set": ["weak_label.size_weight=1"]})
    assert base != key(arm={**arm, "noise": 0.05})
    assert base != key(seed=1)
    assert base != key(data="other data")
    assert base != key(code="changed code")
    assert base != key(spec={**spec, "set": ["train.epochs=2"]})


def test_the_dataset_key_follows_the_content_not_where_it_lies(tmp_path):
    def key(folder: str, manifest: str, overrides=()) -> str:
        source = tmp_path / folder / "kvasir-seg"
        source.mkdir(parents=True, exist_ok=True)
        (source / "MANIFEST.sha256").write_text(manifest)
        params = harness.load_params("kvasir-seg", tmp_path, "demo", [f"ingest.source={source}", *overrides])
        return harness.dataset_key(params)

    base = key("checkout-a", "abc  images/1.jpg\n")
    assert base == key("checkout-b", "abc  images/1.jpg\n")
    assert base != key("checkout-c", "abd  images/1.jpg\n")
    assert base != key("checkout-a", "abc  images/1.jpg\n", ["ingest.split_seed=7"])


def test_a_report_before_any_run_says_so_instead_of_an_empty_table():
    text = experiment.table(results(full=("", None, {})), {})
    assert "No finished runs of `demo`" in text and "|" not in text


def results(**arms) -> dict:
    return {"name": "demo", "arms": {name: {"label": name, "group": group, "baseline": baseline,
                                            "runs": {s: {"val_dice": v, "test_dice": t} for s, (v, t) in runs.items()}}
                                     for name, (group, baseline, runs) in arms.items()}}


def test_the_choice_is_made_on_validation_not_test():
    found = results(full=("", None, {0: (0.8, 0.8)}),
                    a=("g", "full", {0: (0.6, 0.7), 1: (0.6, 0.7)}),   # better on test
                    b=("g", "full", {0: (0.65, 0.5), 1: (0.65, 0.5)}),  # better on validation
                    c=("h", "full", {0: (0.1, 0.1)}))
    assert experiment.chosen_arms(found) == {"b", "c"}
    text = experiment.table(found, {})
    row_b = next(line for line in text.splitlines() if line.startswith("| **b**"))
    assert "(chosen on val)" in row_b
    assert "0.625" in row_b  # test / baseline: 0.5 / 0.8 per seed
    assert "-0.1500" in row_b  # val − baseline at the same seed: 0.65 − 0.8 (seed 0 only: full ran it alone)
    assert "| a |" in text and "0.875" in text


def test_readme_block_is_rewritten_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- experiment:demo -->\nold\n<!-- /experiment:demo -->\nafter\n")
    experiment.write_readme_block("demo", "| new |", readme)
    assert readme.read_text() == "before\n<!-- experiment:demo -->\n| new |\n<!-- /experiment:demo -->\nafter\n"
    with pytest.raises(SystemExit, match="no <!-- experiment:other -->"):
        experiment.write_readme_block("other", "x", readme)


@pytest.mark.slow
def test_two_processes_side_by_side_run_each_pair_once_and_the_report_finds_them(tmp_path):
    """Real processes: two `run`s of one spec start together on one cache; every (arm, seed) is
    run exactly once (the per-key lock), and `report` finds them all under the current keys."""
    shared_dataset("cvc-clinicdb")
    spec = tmp_path / "side-by-side.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "side-by-side", "kind": "propagation", "dataset": "cvc-clinicdb", "seeds": [0, 1],
        "set": ["video.image_size=32", "video.depth=2", "video.key_frames=auto"],
        "arms": {"copy": {"method": "copy"}, "flow": {"method": "flow", "group": "g", "baseline": "copy"}}}))
    command = [sys.executable, str(REPO / "bench" / "experiment.py"), "run", str(spec), "--cache", str(tmp_path / "cache")]
    env = {**os.environ, "LESIONFLOW_SHARED_DATA": str(SHARED_DATA)}
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ran = [line for out in outputs for line in out.splitlines() if re.match(r"(copy|flow) seed \d: val_dice", line)]
    assert sorted(line.split(":")[0] for line in ran) == ["copy seed 0", "copy seed 1", "flow seed 0", "flow seed 1"]

    report = subprocess.run([*command[:2], "report", str(spec), "--cache", str(tmp_path / "cache")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in report.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| arm")}
    assert rows == {"copy": "2", "**flow** (chosen on val)": "2"}


@pytest.mark.slow
def test_a_seed_model_trains_once_per_share_and_starts_the_arm(tmp_path, monkeypatch):
    """``seed_from`` (bench/weak_vs_full.py): the model an arm starts from is trained on the named
    dataset's masks — a seeded share of them — cached by its key, and reused, not retrained."""
    from bench import harness, weak_vs_full

    shared_dataset("cvc-clinicdb")
    monkeypatch.setattr(harness, "DATA", SHARED_DATA)
    params = harness.load_params("cvc-clinicdb", tmp_path, "seeded", [
        "train.image_size=32", "train.epochs=1", "train.batch_size=8", "train.max_minutes=null",
        "train.device=cpu", "model.depth=2"])
    dataset, _ = harness.cached_dataset(params, tmp_path)
    arm = {"labels": "none", "seed_from": "cvc-clinicdb", "seed_masks": 0.05}
    first = weak_vs_full.run_arm(params, dataset, arm, 0, tmp_path)
    assert 0 <= first["val_dice"] <= 1 and 0 <= first["test_dice"] <= 1
    (model_file,) = (tmp_path / "seed-models").glob("*.pt")
    trained_at = model_file.stat().st_mtime_ns
    assert weak_vs_full.run_arm(params, dataset, arm, 0, tmp_path) == first  # the cached model, not a new one
    assert model_file.stat().st_mtime_ns == trained_at
    weak_vs_full.run_arm(params, dataset, {**arm, "seed_masks": 0.1}, 0, tmp_path)
    assert len(list((tmp_path / "seed-models").glob("*.pt"))) == 2  # another share is another model
    with pytest.raises(SystemExit, match="seed_masks must lie in"):
        weak_vs_full.run_arm(params, dataset, {**arm, "seed_masks": 1.5}, 0, tmp_path)
    with pytest.raises(SystemExit, match="labels: none scores the seed_from model"):
        weak_vs_full.run_arm(params, dataset, {"labels": "none"}, 0, tmp_path)


@pytest.mark.slow
def test_the_supervised_kind_trains_the_plain_model_and_scores_what_is_served(tmp_path):
    """``kind: supervised`` (bench/model_bench.py run_arm) through the real CLI: each arm trains,
    exports as the evaluate step does and is scored on val and test; the report pairs the arms by
    seed."""
    shared_dataset("cvc-clinicdb")
    spec = tmp_path / "supervised.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "supervised-demo", "kind": "supervised", "dataset": "cvc-clinicdb", "seeds": [0],
        "set": ["train.image_size=32", "train.epochs=2", "train.max_minutes=null", "model.depth=2",
                "train.device=cpu", "evaluate.int8_calibration_images=4"],
        "arms": {"shipped": {"group": "g"}, "ema": {"group": "g", "baseline": "shipped", "set": ["train.ema_decay=0.9"]}}}))
    command = [sys.executable, str(REPO / "bench" / "experiment.py"), "run", str(spec), "--cache", str(tmp_path / "cache")]
    env = {**os.environ, "LESIONFLOW_SHARED_DATA": str(SHARED_DATA)}
    ran = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    for arm in ("shipped", "ema"):
        line = next(line for line in ran.stdout.splitlines() if line.startswith(f"{arm} seed 0:"))
        metrics = dict(re.findall(r"(\w+) ([\d.]+)", line.split(":", 1)[1]))
        assert set(metrics) >= {"val_dice", "test_dice", "val_dice_float", "epochs"}, line
        assert float(metrics["epochs"]) == 2 and all(0 <= float(metrics[k]) <= 1 for k in ("val_dice", "test_dice"))

    report = subprocess.run([*command[:2], "report", str(spec), "--cache", str(tmp_path / "cache")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr
    row = next(line for line in report.stdout.splitlines() if "| ema" in line or "**ema**" in line)
    assert re.search(r"\| [+-]\d\.\d{4} \|", row), row  # its paired validation gap to shipped
