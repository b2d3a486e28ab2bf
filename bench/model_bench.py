"""Which segmentation model to ship: accuracy, speed and training throughput, side by side.

Arms are named model + train settings (``ARMS``; each applied over ``params.yaml`` +
``configs/kvasir-seg.yaml``). For each arm, measured in one run:

- ``params``: parameters (M);
- ``train img/s``: images per second of one training step as ``fit`` takes it (forward, loss,
  backward, AdamW, EMA; ``bench/train_throughput.py``) at the arm's image size, batch size and
  precision, from the cached dataset — the throughput the Kvasir setting trains at;
- ``fps main`` / ``fps worker``: end-to-end frames/s (resize, normalise, network, sigmoid, resize
  back) on 256×256 frames, batch 1, on the main thread and on a worker thread, through torch,
  through ONNX Runtime (``ort``, what a registered version serves through) and through its int8
  twin (``ort int8``: calibrated on train images as the evaluate step does, which serves it where
  validation Dice allows);
- with ``--train``: ``val Dice`` after training on the Kvasir-SEG train split (model selection
  uses the validation split only; ``val Dice int8`` through the int8 twin) and, with ``--test``
  (touch it once, at the end), ``test Dice`` on Kvasir-SEG test and on all of CVC-ClinicDB (never
  trained on), each also through the int8 twin.

    python bench/model_bench.py                         # speed columns only (a minute)
    python bench/model_bench.py --train --epochs 10     # + validation Dice (proxy budget)
    python bench/model_bench.py --train --arms resunet24-strong --test
    python bench/model_bench.py --train --save DIR ...; then --saved DIR --test   (score the arms once)

``run_arm`` is the ``supervised`` kind of ``bench/experiment.py``: one config change against the
shipped one over seeds (``experiments/kvasir-levers.yaml``), scored through the graph that is served.

Kvasir-SEG (Jha et al., MMM 2020) and CVC-ClinicDB (Bernal et al., CMIG 2015): research use.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import cached_dataset, log_epoch
from bench.runtime_bench import frames_per_second, on_worker
from bench.train_throughput import DATA, kvasir_params, train_throughput
from lesionflow import config
from lesionflow.config import EvaluateConfig
from lesionflow.data.manifest import read_manifest
from lesionflow.models import runtime
from lesionflow.models.pyfunc import SegmentationModel
from lesionflow.models.segmenter import Segmenter
from lesionflow.steps.evaluate import calibration_batch, score_model, served_predictor
from lesionflow.steps.train import new_segmenter
from lesionflow.training import SegmentationDataset, fit, labelled, seed_everything

BEFORE = ["model.arch=unet", "model.base_channels=16", "train.augment=flips", "train.loss=dice_bce",
          "train.deep_supervision=0", "train.ema_decay=null"]
RESUNET = ["model.arch=resunet", "model.blocks=2", "train.loss=structure", "train.deep_supervision=0.4",
           "train.ema_decay=0.995", "train.augment=strong"]
ARMS: dict[str, list[str]] = {
    "unet16 (before)": BEFORE,
    "resunet16-strong": [*RESUNET, "model.base_channels=16"],
    "resunet24-strong": [*RESUNET, "model.base_channels=24"],
    "resunet32-strong": [*RESUNET, "model.base_channels=32"],
    "resunet24-flips-dicebce": ["model.arch=resunet", "model.base_channels=24", "train.augment=flips",
                                "train.loss=dice_bce", "train.deep_supervision=0", "train.ema_decay=null"],
}


def arm_params(arm: str, extra: list[str]) -> config.Params:
    return kvasir_params(["train.max_minutes=null", *ARMS[arm], *extra])


def int8_twin(model: Segmenter, kvasir: Path, train: list) -> runtime.OnnxSegmenter:
    """``model``'s int8 ONNX graph, calibrated as the evaluate step calibrates it."""
    calibration = calibration_batch(model.eval(), kvasir, train, EvaluateConfig().int8_calibration_images)
    return runtime.OnnxSegmenter(runtime.quantize_int8(runtime.to_onnx(model), calibration), model)


def run_arm(params: config.Params, dataset: Path, arm: dict, seed: int, cache: Path) -> dict[str, float]:
    """The plain model as the pipeline's train step trains it (``fit``, the best validation epoch),
    scored through what the evaluate step would serve (``served_predictor``: the int8 twin where
    validation allows, with ``model.tta``): ``val_dice`` (what chooses) and ``test_dice``; and the
    training's own one-view float measure ``val_dice_float`` and ``epochs`` run (a
    ``train.max_minutes`` budget shortens the schedule on a slow machine)."""
    seed_everything(seed, params.train.deterministic)
    records = read_manifest(dataset)
    train, val, test = (labelled(records, s) for s in ("train", "val", "test"))
    model = new_segmenter(params, dataset)
    fitted = fit(model, SegmentationDataset(dataset, train, model, augment=params.train.augment, seed=seed),
                 SegmentationDataset(dataset, val, model), params.train, seed=seed, on_epoch=log_epoch)
    with tempfile.TemporaryDirectory() as onnx_dir:
        served, _ = served_predictor(params, model.eval(), dataset, records, Path(onnx_dir))
        return {"val_dice": score_model(served, dataset, val, params.evaluate.threshold).overall("dice"),
                "test_dice": score_model(served, dataset, test, params.evaluate.threshold).overall("dice"),
                "val_dice_float": fitted.best_val_dice, "epochs": float(fitted.epochs_run)}


def speed_columns(model, frames: list[np.ndarray], int8: runtime.OnnxSegmenter) -> dict[str, float]:
    """Frames/s (runtime_bench's end-to-end loop) through torch, ONNX Runtime and its int8 twin,
    main and worker thread."""
    torch_model = SegmentationModel.wrap(model.eval())
    onnx = SegmentationModel.wrap(model)
    onnx.predictor = runtime.predictor(model, runtime="onnxruntime")
    quantized = SegmentationModel.wrap(model)
    quantized.predictor = int8
    columns = {}
    for prefix, wrapped in (("", torch_model), ("ort ", onnx), ("ort int8 ", quantized)):
        frames_per_second(wrapped, frames[:3])  # warm-up
        columns[f"{prefix}fps main"] = frames_per_second(wrapped, frames)[0]
        columns[f"{prefix}fps worker"] = on_worker(frames_per_second, wrapped, frames)[0]
    return columns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    ap.add_argument("--train", action="store_true", help="train each arm and report validation Dice")
    ap.add_argument("--test", action="store_true", help="also score the test split and CVC-ClinicDB")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lesionflow-model-bench")
    ap.add_argument("--set", action="append", default=[], help="extra key=value overrides, all arms")
    ap.add_argument("--save", type=Path, default=None,
                    help="save each trained arm's weights here, to score the chosen one on test later")
    ap.add_argument("--saved", type=Path, default=None,
                    help="load each arm's weights from this --save folder instead of training (with --test: "
                         "score arms trained earlier, once the choice is made)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    extra = args.set + ([f"train.epochs={args.epochs}"] if args.epochs else [])

    kvasir, _ = cached_dataset(arm_params(args.arms[0], extra), args.work)
    records = read_manifest(kvasir)
    train, val, test = (labelled(records, s) for s in ("train", "val", "test"))
    if args.test:  # all of CVC-ClinicDB, never trained on
        clinic, _ = cached_dataset(config.load([REPO / "params.yaml", REPO / "configs" / "cvc-clinicdb.yaml"], [
            f"ingest.source={DATA / 'cvc-clinicdb'}", "ingest.split.train=0", "ingest.split.val=0", "ingest.split.test=1"]),
            args.work)
    frames = [np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8)
              for i in range(args.frames)]
    print(f"Kvasir-SEG: train {len(train)}, val {len(val)}, test {len(test)}; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    rows = []
    for arm in args.arms:
        params = arm_params(arm, extra)
        cfg = params.train
        model = new_segmenter(params, kvasir)
        train_set = SegmentationDataset(kvasir, train, model, augment=cfg.augment, seed=params.seed)
        row = {"arm": arm, "size": cfg.image_size,
               "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
               "train img/s": train_throughput(params, kvasir, train_set, steps=6),
               **speed_columns(model, frames, int8_twin(model, kvasir, train))}
        if args.saved:
            model = Segmenter.load(args.saved / f"{arm.split()[0]}-seed{params.seed}.pt").eval()
            model.tta = params.model.tta  # the arm's test-time flips over the weights trained once
            row["val Dice"] = score_model(model, kvasir, val, params.evaluate.threshold).overall("dice")
        elif args.train:
            fitted = fit(model, train_set, SegmentationDataset(kvasir, val, model), cfg, seed=params.seed,
                         on_epoch=lambda r: print(f"  {arm} epoch {r['epoch'] + 1}: val Dice "
                                                  f"{r['val_dice']:.3f} ({r['seconds'] / 60:.1f} min)"))
            row.update({"epochs": fitted.epochs_run, "minutes": fitted.seconds / 60,
                        "val Dice": score_model(model, kvasir, val, params.evaluate.threshold).overall("dice")})
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                model.save(args.save / f"{arm.split()[0]}-seed{params.seed}.pt")
        if args.saved or args.train or args.test:
            twin = int8_twin(model, kvasir, train)
            row["val Dice int8"] = score_model(twin, kvasir, val, params.evaluate.threshold).overall("dice")
        if args.test:
            row["test Dice"] = score_model(model, kvasir, test, params.evaluate.threshold).overall("dice")
            row["test Dice int8"] = score_model(twin, kvasir, test, params.evaluate.threshold).overall("dice")
            clinic_frames = labelled(read_manifest(clinic), "test")
            row["ClinicDB Dice"] = score_model(model, clinic, clinic_frames, params.evaluate.threshold).overall("dice")
            row["ClinicDB Dice int8"] = score_model(twin, clinic, clinic_frames,
                                                    params.evaluate.threshold).overall("dice")
        rows.append(row)
        print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)

    columns = list(dict.fromkeys(k for row in rows for k in row))
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                for c in columns) + " |")
    base = rows[0]
    for row in rows[1:]:
        print(f"{row['arm']} / {base['arm']}: train img/s ×{row['train img/s'] / base['train img/s']:.2f}, "
              f"fps ×{row['fps worker'] / base['fps worker']:.2f} (torch), "
              f"×{row['ort fps worker'] / base['ort fps worker']:.2f} (ONNX Runtime), "
              f"×{row['ort int8 fps worker'] / base['ort int8 fps worker']:.2f} (int8)")


if __name__ == "__main__":
    main()
