"""The lesionflow pipeline: wiring only. Compiled to ``lesionflow_pipeline.yaml`` for clusters and
run as is by ``lesionflow run`` with kfp.local."""

from pathlib import Path

from kfp import compiler, dsl

from components import steps
from lesionflow.config import ClusterConfig
from lesionflow.errors import ConfigError
from pipelines.platform import configure

COMPILED = Path(__file__).with_suffix(".yaml")


def build(cluster: ClusterConfig | None = None):
    """The pipeline with ``cluster``'s Kubernetes settings on its tasks (kfp.local ignores them)."""
    cluster = cluster or ClusterConfig()

    @dsl.pipeline(name="lesionflow",
                  description="ingest → synthesize_video → pseudo_label → meta_train → evaluate → register (gated)")
    def lesionflow_pipeline(params_json: str) -> str:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        common = {"params_json": params_json, "pipeline_run_id": run_id}
        ingest = steps.ingest(**common, lineage_json="")
        video = steps.synthesize_video(**common, lineage_json=ingest.outputs["lineage"],
                                       dataset=ingest.outputs["dataset"])
        labels = steps.pseudo_label(**common, lineage_json=video.outputs["lineage"],
                                    dataset=video.outputs["augmented"])
        train = steps.meta_train(**common, lineage_json=labels.outputs["lineage"],
                                 dataset=labels.outputs["labelled"])
        evaluate = steps.evaluate(**common, lineage_json=train.outputs["Output"],
                                  dataset=ingest.outputs["dataset"], model=train.outputs["model"])
        register = steps.register(**common, lineage_json=train.outputs["Output"],
                                  model=train.outputs["model"], report=evaluate.outputs["report"])
        for task in (ingest, labels, evaluate, register):
            configure(task, cluster)
        for task in (video, train):  # the steps that train a network
            configure(task, cluster, trains=True)
        return register.output

    return lesionflow_pipeline


lesionflow_pipeline = build()


def compile_pipeline(path: Path = COMPILED, cluster: ClusterConfig | None = None) -> Path:
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"compile output {path} must be a .yaml file (KFP's format)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(build(cluster), str(path))
    except OSError as err:
        raise ConfigError(f"cannot write the compiled pipeline to {path}: {err.strerror}") from None
    return path
