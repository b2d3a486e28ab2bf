"""Kubernetes settings for the pipeline's tasks (kfp-kubernetes), from ``params.yaml: cluster``.

They only land in the compiled YAML's ``platforms.kubernetes`` section; kfp.local ignores them.
"""

from kfp import kubernetes
from kfp.dsl import PipelineTask

import lesionflow
from lesionflow.config import ClusterConfig


def configure(task: PipelineTask, cluster: ClusterConfig, *, trains: bool = False) -> PipelineTask:
    """Credentials and artifact storage for every task; node placement and resources for the
    tasks that train (``trains``)."""
    # Every step reads or moves external state (source data, corrections, the MLflow registry),
    # so a cached result from an earlier run with the same params would be stale.
    task.set_caching_options(False)
    if cluster.credentials_secret:
        kubernetes.use_secret_as_env(
            task, secret_name=cluster.credentials_secret,
            secret_key_to_env={key: key for key in cluster.secret_env}, optional=True)
    if cluster.artifacts_pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.artifacts_pvc, mount_path=cluster.artifacts_mount)
    if not trains:
        return task
    train = cluster.train
    for key, value in train.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    if train.gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(train.gpus)
        # GPU nodes are usually tainted so only GPU work lands there
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    if train.cpu:
        task.set_cpu_request(train.cpu).set_cpu_limit(train.cpu)
    if train.memory:
        task.set_memory_request(train.memory).set_memory_limit(train.memory)
    if train.num_nodes > 1:  # the step's TrainJob runs the image the pipeline runs (lesionflow.IMAGE)
        task.set_env_variable("LESIONFLOW_IMAGE", lesionflow.IMAGE)
    return task
