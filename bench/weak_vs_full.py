"""Area ratios only vs full masks on real data, same network, same budget (issue #6).

Protocol (the package's own functions, as the pipeline runs them):

1. ingest the dataset (cached under ``--work``, outside the repository);
2. ``weaken`` it: every training mask becomes its lesion area ratio (``--noise`` adds uniform
   error up to that much and records it as the estimate error e); val/test keep their masks;
3. ``full``: plain supervised training on the masks (``training.fit``);
   ``weak``: ``weak.train.fit_weak`` on the ratios alone (superpixels → graph → GCN → count rule,
   re-ranked every epoch), the same U-Net, image size, batch size, LR schedule and epochs;
   both keep the weights of their best validation-Dice epoch (val masks, the same for both);
4. both are scored on the held-out test split at native resolution (``evaluate.score_model``);
   the weak arm's final pseudo-labels are also compared with the hidden train masks.

    python bench/weak_vs_full.py kvasir-seg [--image-size 128] [--epochs 6] [--noise 0.0] [--arms full weak]
    python bench/weak_vs_full.py busi
    python bench/weak_vs_full.py kvasir-seg --arms weak --set weak_label.size_weight=1 --set weak_label.rank_by=gcn+head

Runs on one thread (the machine is shared). Prints both Dice figures and weak / full.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesionflow import config
from lesionflow.data.manifest import read_manifest
from lesionflow.data.transforms import load_target
from lesionflow.data.weaken import weaken
from lesionflow.metrics import dice
from lesionflow.steps.evaluate import score_model
from lesionflow.steps.ingest import build_dataset
from lesionflow.steps.train import new_segmenter
from lesionflow.training import SegmentationDataset, fit, labelled
from lesionflow.weak.train import WeakTrainingSet, fit_weak

CONFIGS = {"kvasir-seg": "configs/kvasir-seg.yaml", "busi": "configs/busi.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(CONFIGS))
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--noise", type=float, default=0.0, help="area-ratio error (uniform ±), also e")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lesionflow-weak-bench")
    ap.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    ap.add_argument("--arms", nargs="+", choices=["full", "weak"], default=["full", "weak"])
    args = ap.parse_args()
    torch.set_num_threads(1)

    params = config.load([REPO / "params.yaml", REPO / CONFIGS[args.dataset]], [
        f"ingest.source={REPO.parent / 'shared' / 'data' / args.dataset}",
        f"train.image_size={args.image_size}", f"train.epochs={args.epochs}",
        f"weak_label.epochs={args.epochs}", "train.max_minutes=null", "train.device=cpu", *args.set])
    full_dir = args.work / args.dataset
    weak_dir = args.work / f"{args.dataset}-weak-{args.noise:g}"
    if not full_dir.exists():
        build_dataset(params, full_dir)
    if not weak_dir.exists():
        weaken(full_dir, weak_dir, noise=args.noise, seed=params.seed)
    records = read_manifest(weak_dir)
    train_full = labelled(read_manifest(full_dir), "train")
    weak = [r for r in records if r.kind == "weak"]
    val, test = labelled(records, "val"), labelled(records, "test")
    print(f"{args.dataset}: train {len(train_full)} (weak arm: {len(weak)} area ratios), val {len(val)}, "
          f"test {len(test)}; U-Net {params.model.base_channels} ch depth {params.model.depth}, "
          f"{args.image_size}², {args.epochs} epochs, batch {params.train.batch_size}, 1 thread; weak: "
          f"size_weight {params.weak_label.size_weight}, rank_by {params.weak_label.rank_by}")

    results = {}
    if "full" in args.arms:
        model = new_segmenter(params, full_dir)
        start = time.monotonic()
        fitted = fit(model, SegmentationDataset(full_dir, train_full, model, augment=params.train.augment,
                                                seed=params.seed),
                     SegmentationDataset(full_dir, val, model), params.train, seed=params.seed)
        results["full"] = (score_model(model, full_dir, test, params.evaluate.threshold).overall("dice"),
                           time.monotonic() - start, fitted.best_epoch)
        print(f"full: test Dice {results['full'][0]:.3f}")
    if "weak" not in args.arms:
        return

    model = new_segmenter(params, weak_dir)
    start = time.monotonic()
    data = WeakTrainingSet(weak_dir, [], weak, model, params.weak_label.default_error,
                           augment=params.train.augment, seed=params.seed)
    weak_fit = fit_weak(model, data, params.weak_label, params.train, seed=params.seed,
                        val=SegmentationDataset(weak_dir, val, model),
                        on_epoch=lambda row: print({k: round(v, 3) if isinstance(v, float) else v
                                                    for k, v in row.items()}))
    results["weak"] = (score_model(model, weak_dir, test, params.evaluate.threshold).overall("dice"),
                       time.monotonic() - start, weak_fit.best_epoch)

    truth = {r.id: r for r in train_full}
    pseudo = [dice(a.target == 1, load_target(full_dir, truth[r.id], args.image_size) == 1)
              for r, a in zip(weak, weak_fit.annotations, strict=True)]
    ignored = np.mean([(a.target == -1).mean() for a in weak_fit.annotations])

    print(f"\n{'arm':<6}{'test Dice':>10}{'minutes':>9}{'best epoch':>12}")
    for arm, (score, seconds, best) in results.items():
        print(f"{arm:<6}{score:>10.3f}{seconds / 60:>9.1f}{best + 1:>12}")
    if "full" in results:
        print(f"weak / full Dice: {results['weak'][0] / results['full'][0]:.2f}  "
              f"(literature: size-constrained weak supervision ≈ 0.85–0.9)")
    print(f"final weak pseudo-labels vs hidden train masks: Dice {np.mean(pseudo):.3f}, "
          f"ignored pixels {ignored:.1%}")


if __name__ == "__main__":
    main()
