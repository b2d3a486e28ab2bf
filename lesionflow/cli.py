"""``lesionflow`` command line: thin shims over the package (argument parsing and printing only)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from lesionflow import config, skip_exit_gc
from lesionflow.errors import LeaseHeldError, LesionflowError
from lesionflow.lineage import NONE


def params_files(named: list[str] | None) -> list[str]:
    """The files ``--params`` names; without it ``./params.yaml`` if this folder has one, else
    none: the built-in defaults (said on stderr, so a run outside the repository is not a
    surprise). A named file that is missing is an error, never a silent fallback."""
    if named is not None:
        return named
    if Path(config.PARAMS_FILE).is_file():
        return [config.PARAMS_FILE]
    print(f"lesionflow: no {config.PARAMS_FILE} here: built-in defaults (`lesionflow params` "
          "prints them)", file=sys.stderr)
    return []


def _load_params(args: argparse.Namespace) -> config.Params:
    overrides = list(args.set or [])
    if getattr(args, "source", None):
        overrides.append(f"ingest.source={args.source}")
    params = config.load(params_files(args.params), overrides)
    # Components run as subprocesses (or pods): pin the workdir to an absolute path once here.
    runtime = params.runtime.model_copy(update={"workdir": str(params.runtime.resolved_workdir())})
    return params.model_copy(update={"runtime": runtime})


def cmd_run(args: argparse.Namespace) -> int:
    from lesionflow.pipeline_runs import run_local

    params = _load_params(args)
    print(format_summary(run_local(params), params.train))
    return 0


def format_summary(summary: dict, train: config.TrainConfig) -> str:
    """The run's outcome; ``train``, the settings it ran with, says what a cut schedule planned."""
    overall = summary["test_metrics"]["overall"]
    lines = [
        "",
        "lesionflow run finished",
        f"  pipeline run     {summary['pipeline_run_id']}",
        f"  dataset (DVC)    {summary['dataset_dvc_md5']}",
        f"  corrections      {summary['corrections_md5']}",
        *budget_line(summary, train),
        f"  test metrics     dice {overall['dice']:.3f}  iou {overall['iou']:.3f}  "
        f"hd95 {overall['hd95']:.1f}{hd95_unit(overall)}  (n={overall['n']})",
    ]
    for name, row in summary["test_metrics"].items():
        if name != "overall":
            lines.append(f"    {name:<14} dice {row['dice']:.3f}  iou {row['iou']:.3f}  (n={row['n']})")
    lines += [
        f"  inference        {summary['fps']:.1f} frames/s served as {summary['served']} (real time: 30)",
        f"  registered       {summary['model']} v{summary['version']}",
        f"  gate             {'promoted' if summary['promoted'] else 'refused'}: {summary['gate']}",
        *([f"  compared on      {c['n']} test records neither model has seen (champion "
           f"v{c['champion_version']}; {c['excluded']['seen_by_champion']} left out: it trained or "
           f"selected on them)"] if (c := summary["compared"]) else []),
        f"  champion         v{summary['champion']}",
        *[f"  recovered        {line}" for line in summary.get("recovered", [])],
        f"  MLflow           {summary['tracking_uri']}",
    ]
    return "\n".join(lines)


def budget_line(summary: dict, train: config.TrainConfig) -> list[str]:
    """Why a model trained on a slower machine scores lower than the same config elsewhere: the
    budget ran fewer epochs (``train.max_minutes``), and in what precision (``precision: auto``
    trains in fp32 on a CPU without bf16 units, where emulated bf16 would be slower still)."""
    if summary["trained_epochs"] == NONE:
        return []
    precision = "" if summary["trained_precision"] == NONE else f" in {summary['trained_precision']}"
    return [f"  training         {summary['trained_epochs']} of {train.epochs} epochs{precision}: "
            f"train.max_minutes {train.max_minutes:g} ended the schedule on this machine "
            "(--set train.max_minutes=null runs them all)"]


def hd95_unit(row: dict) -> str:
    """mm where every image's pixel spacing was known (DICOM, NIfTI, NRRD), else pixels."""
    return "mm" if row.get("hd95_in_mm") else "px"


def cmd_compile(args: argparse.Namespace) -> int:
    if args.image:
        import lesionflow

        # Components read the image when their module is imported, which happens just below.
        lesionflow.IMAGE = args.image
    from pipelines.lesionflow_pipeline import COMPILED, compile_pipeline

    print(compile_pipeline(Path(args.out or COMPILED), cluster=_load_params(args).cluster))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from lesionflow.pipeline_runs import submit

    run_id = submit(_load_params(args), host=args.host, experiment=args.experiment,
                    run_name=args.run_name, schedule=args.schedule)
    what = f"recurring run {run_id} ({args.schedule})" if args.schedule else f"run {run_id}"
    print(f"submitted {what} to {args.host}")
    return 0


def cmd_weaken(args: argparse.Namespace) -> int:
    from lesionflow.data.weaken import weaken

    records = weaken(args.dataset, args.out, fraction=args.fraction, noise=args.noise, seed=args.seed)
    n_weak = sum(r.kind == "weak" for r in records)
    print(f"{args.out}: {n_weak} of {len(records)} records are now area-ratio weak labels "
          f"(noise ±{args.noise:g})")
    return 0


def cmd_corrections_add(args: argparse.Namespace) -> int:
    from lesionflow import corrections

    params = _registry_params(args)
    version = corrections.add(params, args.source, model_version=args.model_version,
                              reviewer=args.reviewer, fmt=args.format)
    print(f"corrections of {params.runtime.model_name}: version {version.md5} holds "
          f"{version.n_corrections} correction(s) (MLflow run {version.run_id})")
    return 0


def cmd_corrections_status(args: argparse.Namespace) -> int:
    from lesionflow import retrain

    params = _registry_params(args)
    decision = retrain.decide(params, args.min_corrections)
    print(f"{params.runtime.model_name}: {decision.reason}"
          + (f" (newest corrections version {decision.corrections_md5})" if decision.corrections_md5 else ""))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    """What the schedule runs: start the pipeline only past ``--min-corrections`` new ones."""
    from lesionflow import retrain
    from lesionflow.pipeline_runs import run_local, submit

    params = _registry_params(args)
    decision = retrain.decide(params, args.min_corrections)
    if not decision.start:
        print(f"retrain: nothing to do: {decision.reason}")
        return 0
    print(f"retrain: starting: {decision.reason}")
    params = retrain.pinned(params, decision)
    if args.warm_start:
        params = params.with_section("train", init_from="champion")
    if args.host:
        run_id = submit(params, host=args.host, experiment=args.experiment, run_name=args.run_name)
        print(f"submitted run {run_id} to {args.host}")
        return 0
    try:
        print(format_summary(run_local(params), params.train))
    except LeaseHeldError as err:  # another tick got there first: its run trains on the same data
        print(f"retrain: nothing to do: {err}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    params = _load_params(args)  # a params mistake is reported before the slow imports
    from lesionflow.steps.ingest import build_dataset

    report = build_dataset(params, Path(args.out))
    print(report.summary())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a registered version on the data ``ingest`` describes, e.g. a model trained on one
    dataset against all of another (cross-dataset generalisation)."""
    import tempfile

    from lesionflow import registry
    from lesionflow.data.manifest import read_manifest
    from lesionflow.steps.evaluate import score_model, select
    from lesionflow.steps.ingest import build_dataset

    params = _registry_params(args)
    model = registry.load_pyfunc(params.runtime.model_name, args.model).predictor  # as served
    with tempfile.TemporaryDirectory(prefix="lesionflow-eval-") as tmp:
        dataset = Path(tmp) / "dataset"
        build_dataset(params, dataset)
        records = select(read_manifest(dataset), args.split)
        score = score_model(model, dataset, records, params.evaluate.threshold)
    print(f"{params.runtime.model_name} {args.model} on {params.ingest.source} ({args.split}):")
    for name, row in score.table.items():
        print(f"  {name:<12} n={row['n']:<5} dice {row['dice']:.3f}  iou {row['iou']:.3f}  "
              f"hd95 {row['hd95']:.1f}{hd95_unit(row)}")
    print(f"  {score.fps:.1f} frames/s")
    return 0


def _registry_params(args: argparse.Namespace) -> config.Params:
    from lesionflow import tracking

    params = _load_params(args)
    tracking.connect(params)
    return params


def cmd_history(args: argparse.Namespace) -> int:
    from lesionflow import registry

    params = _registry_params(args)
    moves = registry.history(params.runtime.model_name, alias=args.alias)
    if not moves:
        print(f"no {args.alias} moves recorded for {params.runtime.model_name}")
    for m in moves:
        if m.action == "refuse":
            print(f"{m.when}  refuse   {m.alias}: v{m.candidate} refused, stays {m.to_version}  "
                  f"by {m.who}  ({m.why})")
        else:
            print(f"{m.when}  {m.action:<8} {m.alias}: {m.from_version or '-'} → {m.to_version}  "
                  f"by {m.who}  ({m.why})")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Rebuild a version from its lineage; exit 1 if a metric moved more than --tolerance."""
    from lesionflow.reproduce import METRICS, reproduce

    params = _registry_params(args)
    result = reproduce(params, args.version)
    name = params.runtime.model_name
    print(f"reproduce {name} v{result.version}")
    for role, md5 in result.datasets.items():
        print(f"  {role:<14} {md5} (pulled from {params.runtime.remote()})")
    print("  differs        " + ("; ".join(result.notes) or "nothing: the commit that trained it, clean"))
    print(f"  {result.split} split: registered → rebuilt (difference)")
    gaps = result.differences()
    for lesion_type, row in result.registered.items():
        cells = [f"{m} {row[m]:.4f} → {result.rebuilt[lesion_type][m]:.4f} ({gaps[lesion_type][m]:+.4f})"
                 for m in METRICS]
        print(f"    {lesion_type:<12} " + "   ".join(cells))
    largest = result.largest_difference()
    verdict = "reproduced" if largest <= args.tolerance else "NOT reproduced"
    print(f"  {verdict}: largest difference {largest:.6f} (tolerance {args.tolerance:g})")
    return 0 if largest <= args.tolerance else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    from lesionflow import registry

    params = _registry_params(args)
    move = registry.rollback(params.runtime.model_name, args.to, why=args.why)
    print(f"champion of {params.runtime.model_name}: v{move.from_version} → v{move.to_version}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lesionflow.review.log import PredictionLog
    from lesionflow.serving import serve

    # the options are overrides of the serve section, so they are validated like it (a JSON
    # string is YAML too: "::" or "3" stay strings)
    args.set = [*(args.set or []), *(f"serve.{key}={json.dumps(value)}" for key, value in
                                     (("host", args.host), ("port", args.port), ("model", args.model))
                                     if value is not None)]
    params = _registry_params(args)
    cfg = params.serve
    serve(params.runtime.model_name, cfg.model, cfg, host=cfg.host, port=cfg.port,
          log=PredictionLog.for_params(params))
    return 0


def cmd_review_next(args: argparse.Namespace) -> int:
    from lesionflow.review.queue import next_batch

    params = _registry_params(args)
    report = next_batch(params, Path(args.out), source=args.source, n=args.n, strategy=args.strategy,
                        model=args.model, dataset=Path(args.dataset) if args.dataset else None)
    print(report.summary())
    for rank, item in enumerate(report.items, 1):
        print(f"  {rank:>3}. {item['id']:<24} score {item['score']:.3f}  {item['lesion_type'] or '-':<12} "
              f"{item['source']}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    """The built-in defaults as commented YAML: ``params.yaml`` is generated with ``--write``."""
    text = config.defaults_yaml()
    if args.write is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.write).write_text(text, encoding="utf-8")
    except OSError as err:
        raise config.ConfigError(f"cannot write {args.write}: {err.strerror}") from None
    print(f"wrote the built-in defaults to {args.write}")
    return 0


def cmd_review_export(args: argparse.Namespace) -> int:
    from lesionflow.formats.review import export_batch

    print(export_batch(Path(args.batch), args.format, Path(args.out)).summary())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lesionflow.export import dataset_items, export, prediction_items

    items = dataset_items(Path(args.dataset)) if args.dataset else prediction_items(Path(args.predictions))
    print(export(items, args.format, Path(args.out)).summary())
    return 0


def cmd_train_worker(args: argparse.Namespace) -> int:
    """One worker process of a TrainJob (under torchrun): dataset from the DVC remote, train, and
    on rank 0 the model to ``--output`` for the meta_train step to collect."""
    from lesionflow.trainjob import work

    work(config.from_json(args.params_json), args.dataset_md5, args.output, scratch=args.scratch)
    return 0


def _count(text: str) -> int:
    """argparse type: a whole number >= 0 (argparse reports anything else as a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesionflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help)
        p.add_argument("--params", nargs="+", metavar="FILE",
                       help="params files, deep-merged in order over the built-in defaults "
                       "(default: ./params.yaml if there is one, else the built-in defaults)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a params key, e.g. --set train.epochs=2 (repeatable)")
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_run, "run the pipeline locally with kfp.local (the main job)")
    p.add_argument("--source", help="shortcut for --set ingest.source=…")
    p = add("compile", cmd_compile, "compile the pipeline to KFP YAML")
    p.add_argument("--out", help="output path (default: pipelines/lesionflow_pipeline.yaml)")
    p.add_argument("--image", help="component image, e.g. the <version>-<gitsha> tag "
                   "scripts/build_image.sh pushed (default: lesionflow.IMAGE)")
    p = add("submit", cmd_submit, "submit the compiled pipeline to a KFP endpoint")
    p.add_argument("--host", required=True)
    p.add_argument("--experiment", default="lesionflow")
    p.add_argument("--run-name", help="run name (with --schedule: the recurring run's name)")
    p.add_argument("--schedule", metavar="CRON",
                   help="create a KFP recurring run on this cron schedule, e.g. '0 3 * * *'")
    p.add_argument("--source", help="shortcut for --set ingest.source=…")
    p = add("retrain", cmd_retrain,
            "run the pipeline if enough reviewer corrections arrived since the last training attempt")
    p.add_argument("--min-corrections", type=_count, required=True, metavar="N")
    p.add_argument("--warm-start", action="store_true",
                   help="fine-tune from the champion's weights (train.init_from=champion)")
    p.add_argument("--host", help="KFP endpoint to submit to (default: run locally with kfp.local)")
    p.add_argument("--experiment", default="lesionflow")
    p.add_argument("--run-name")
    p = add("ingest", cmd_ingest, "build the canonical dataset only (used by dvc.yaml)")
    p.add_argument("--out", required=True)
    p.add_argument("--source", help="shortcut for --set ingest.source=…")
    p = add("evaluate", cmd_evaluate, "score a registered model version on a dataset")
    p.add_argument("--model", default="champion", help="version number or alias (default: champion)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--source", help="shortcut for --set ingest.source=…")
    p = add("history", cmd_history, "show the append-only alias history")
    p.add_argument("--alias", default="champion")
    p = add("reproduce", cmd_reproduce, "rebuild a registered version from its lineage and compare")
    p.add_argument("version", help="version number or alias")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="largest metric difference still counted as reproduced (default 0: exact)")
    p = add("rollback", cmd_rollback, "move champion back to the previous (or a named) version")
    p.add_argument("--to", help="version number (default: the previous champion)")
    p.add_argument("--why", default="manual rollback")
    p = add("serve", cmd_serve, "serve a registered version over HTTP (POST /predict, POST /reload)")
    p.add_argument("--host", help="interface to listen on (default: serve.host)")
    p.add_argument("--port", type=int, help="port (default: serve.port)")
    p.add_argument("--model", help="version number or alias (default: serve.model, champion)")
    p = add("export", cmd_export, "export a dataset or saved predictions as COCO, Pascal VOC, JSON "
            "or the nnU-Net raw layout")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", help="a canonical dataset folder (manifest.jsonl)")
    what.add_argument("--predictions", help="a folder with predictions.jsonl (POST /predict answers)")
    p.add_argument("--format", required=True, choices=["coco", "voc", "json", "nnunet"])
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")

    p = sub.add_parser("params", help="print the built-in defaults as commented YAML (what "
                       "params.yaml holds)")
    p.add_argument("--write", metavar="FILE", help="write them to FILE instead, e.g. params.yaml")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("weaken", help="turn a labelled dataset's train masks into area-ratio weak "
                       "labels (to measure weak supervision against full)")
    p.add_argument("--dataset", required=True, help="a canonical dataset (e.g. from lesionflow ingest)")
    p.add_argument("--out", required=True)
    p.add_argument("--fraction", type=float, default=1.0, help="share of train masks to weaken")
    p.add_argument("--noise", type=float, default=0.0, help="uniform ± noise on each ratio, also "
                   "recorded as its estimate error")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_weaken)

    p = sub.add_parser("train-worker", help="one worker of a multi-node TrainJob (started by the "
                       "meta_train step under torchrun, not by hand)")
    p.add_argument("--params-json", required=True, help="the step's resolved params, as JSON")
    p.add_argument("--dataset-md5", required=True, help="DVC hash of the dataset version to train on")
    p.add_argument("--output", required=True, help="s3://… where rank 0 uploads the model")
    p.add_argument("--scratch", type=Path, help="local folder for the dataset and the model "
                   "(default: <tmp>/lesionflow-train-worker)")
    p.set_defaults(func=cmd_train_worker)

    corrections = sub.add_parser("corrections", help="reviewers' corrected masks").add_subparsers(
        dest="action", required=True)
    p = add("add", cmd_corrections_add, "validate a batch and record a new corrections version",
            parent=corrections)
    p.add_argument("--source", required=True,
                   help="folder or s3:// prefix: images/, masks/, optional corrections.csv")
    p.add_argument("--model-version",
                   help="version whose predictions were corrected (else corrections.csv's column)")
    p.add_argument("--reviewer", help="who corrected the masks (default: $LESIONFLOW_USER, else the "
                   "login name); a reviewer column in corrections.csv overrides it per row")
    p.add_argument("--format", default="folder", choices=["folder", "label-studio", "cvat", "coco"],
                   help="folder: the layout above | label-studio, cvat, coco: the folder `review "
                   "export` wrote, with the tool's export of the reviewed tasks put in it")
    p = add("status", cmd_corrections_status, "corrections since the last training attempt",
            parent=corrections)
    p.add_argument("--min-corrections", type=_count, default=1, metavar="N")

    review = sub.add_parser("review", help="the review queue: which images reviewers label next"
                            ).add_subparsers(dest="action", required=True)
    p = add("next", cmd_review_next, "rank candidates by the model's uncertainty and write the next "
            "batch with its masks as pre-annotations", parent=review)
    p.add_argument("--n", type=_count, help="images in the batch (default: review.batch_size)")
    p.add_argument("--from", dest="source", choices=["unlabelled", "predictions"], default="unlabelled",
                   help="unlabelled: a dataset's records without a mask (--dataset) | predictions: "
                   "served answers whose image was kept (serve.keep_images)")
    p.add_argument("--dataset", help="canonical dataset folder (with --from unlabelled)")
    p.add_argument("--strategy", help="random | entropy | tta | diversity-weighted (default: "
                   "review.strategy)")
    p.add_argument("--model", default="champion", help="version number or alias that scores and "
                   "pre-annotates (default: champion)")
    p.add_argument("--out", required=True, help="batch folder (must not exist or be empty)")
    p = add("export", cmd_review_export, "write a review batch for a reviewer tool: Label Studio "
            "tasks with brush pre-annotations, a CVAT for images 1.1 task, or COCO", parent=review)
    p.add_argument("--batch", required=True, help="the folder `review next` wrote (batch.json)")
    p.add_argument("--format", required=True, choices=["label-studio", "cvat", "coco"])
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    return parser


def main(argv: list[str] | None = None) -> int:
    skip_exit_gc()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LesionflowError as err:
        print(f"lesionflow: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lesionflow: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug, not a user mistake: those are LesionflowErrors raised at their source
        print("lesionflow: internal error, please report it with the traceback below",
              file=sys.stderr)
        traceback.print_exc()
        return 3


if __name__ == "__main__":
    sys.exit(main())
