"""The lesionflow pipeline: wiring only. Compiled to ``lesionflow_pipeline.yaml`` for clusters and
run as is by ``lesionflow run`` with kfp.local."""

from pathlib import Path

from kfp import compiler, dsl

from components import steps

COMPILED = Path(__file__).with_suffix(".yaml")


@dsl.pipeline(name="lesionflow", description="ingest → train → evaluate → register (gated)")
def lesionflow_pipeline(params_json: str) -> str:
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    ingest = steps.ingest(params_json=params_json, pipeline_run_id=run_id)
    train = steps.train(params_json=params_json, pipeline_run_id=run_id,
                        dataset=ingest.outputs["dataset"])
    evaluate = steps.evaluate(params_json=params_json, pipeline_run_id=run_id,
                              dataset=ingest.outputs["dataset"], model=train.outputs["model"])
    register = steps.register(params_json=params_json, pipeline_run_id=run_id,
                              dataset_md5=ingest.outputs["dvc_md5"], model=train.outputs["model"],
                              report=evaluate.outputs["report"])
    return register.output


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(lesionflow_pipeline, str(path))
    return path
