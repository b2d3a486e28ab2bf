"""KFP v2 components: typed signatures around ``lesionflow.steps.entrypoints``, nothing else.

All run in the project image (``lesionflow.IMAGE``), which already holds kfp, so the runtime
``pip install kfp`` is skipped. Bodies import inside the function because KFP ships only the
function's source to the container.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from lesionflow import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(params_json: str, pipeline_run_id: str, lineage_json: str, dataset: Output[Dataset]
           ) -> NamedTuple("IngestOutputs", [("dvc_md5", str), ("n_records", int), ("lineage", str)]):
    """Source (folder, S3 prefix or synthetic) + corrections → canonical dataset, DVC-versioned."""
    from lesionflow.steps import entrypoints

    out = entrypoints.ingest(params_json, pipeline_run_id, lineage_json, dataset.path)
    dataset.metadata.update(out)
    return (out["dvc_md5"], out["n_records"], out["lineage"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def synthesize_video(params_json: str, pipeline_run_id: str, lineage_json: str, dataset: Input[Dataset],
                     augmented: Output[Dataset]) -> NamedTuple(
        "SynthesizeVideoOutputs", [("dvc_md5", str), ("lineage", str)]):
    """Train the next-frame model on the videos; add synthetic videos and propagated labels."""
    from lesionflow.steps import entrypoints

    out = entrypoints.synthesize_video(params_json, pipeline_run_id, lineage_json, dataset.path,
                                       augmented.path)
    augmented.metadata.update(out)
    return (out["dvc_md5"], out["lineage"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pseudo_label(params_json: str, pipeline_run_id: str, lineage_json: str, dataset: Input[Dataset],
                 labelled: Output[Dataset]) -> NamedTuple(
        "PseudoLabelOutputs", [("dvc_md5", str), ("labeller", str), ("lineage", str)]):
    """The champion labels unlabelled train images and scores model-made masks: good / bad task data."""
    from lesionflow.steps import entrypoints

    out = entrypoints.pseudo_label(params_json, pipeline_run_id, lineage_json, dataset.path, labelled.path)
    labelled.metadata.update(out)
    return (out["dvc_md5"], out["labeller"], out["lineage"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def meta_train(params_json: str, pipeline_run_id: str, lineage_json: str, dataset: Input[Dataset],
               model: Output[Model]) -> str:
    """MAML over good/bad task data (or the plain baseline), one model or one per lesion type."""
    from lesionflow.steps import entrypoints

    out = entrypoints.meta_train(params_json, pipeline_run_id, lineage_json, dataset.path, model.path)
    model.metadata.update(out)
    return out["lineage"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(params_json: str, pipeline_run_id: str, lineage_json: str, dataset: Input[Dataset],
             model: Input[Model], report: Output[Dataset], metrics: Output[Metrics]):
    """Dice / IoU / HD95 per lesion type and fps; candidate vs champion on records neither has seen."""
    from lesionflow.steps import entrypoints

    out = entrypoints.evaluate(params_json, pipeline_run_id, lineage_json, dataset.path, model.path,
                               report.path)
    for key, value in out.items():
        metrics.log_metric(key, value)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(params_json: str, pipeline_run_id: str, lineage_json: str, model: Input[Model],
             report: Input[Dataset]) -> str:
    """Register with lineage; move `champion` only if the promotion gate passes."""
    from lesionflow.steps import entrypoints

    return entrypoints.register(params_json, pipeline_run_id, lineage_json, model.path, report.path)
