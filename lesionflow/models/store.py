"""A trained model as a pipeline artifact: one ``Segmenter``, or one per lesion type.

Weights + hyper-parameters (``torch.load(weights_only=True)``), not pickles: a KFP artifact must
load in any later image of the project without executing stored code.
"""

from __future__ import annotations

import json
from pathlib import Path

from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter

SINGLE = "segmenter.pt"
ROUTER = "lesion_types.json"


def save_model(model: Segmenter | LesionTypeRouter, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, Segmenter):
        model.save(out_dir / SINGLE)
        return
    files = {t: f"segmenter-{i}.pt" for i, t in enumerate(model.lesion_types)}
    for lesion_type, name in files.items():
        model.route(lesion_type).save(out_dir / name)
    (out_dir / ROUTER).write_text(json.dumps(files, indent=2, sort_keys=True))


def load_model(model_dir: Path) -> Segmenter | LesionTypeRouter:
    """The saved model in eval mode (batch-norm running statistics), ready for inference."""
    model_dir = Path(model_dir)
    if (model_dir / ROUTER).is_file():
        files = json.loads((model_dir / ROUTER).read_text())
        return LesionTypeRouter({t: Segmenter.load(model_dir / name) for t, name in files.items()}).eval()
    return Segmenter.load(model_dir / SINGLE).eval()
