"""Kubernetes settings for the pipeline's tasks (kfp-kubernetes), from ``params.yaml: cluster``.

They only land in the compiled YAML's ``platforms.kubernetes`` section; kfp.local ignores them.
"""

from kfp import kubernetes
from kfp.dsl import PipelineTask

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
    for key, value in cluster.train_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    if cluster.train_gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(cluster.train_gpus)
        # GPU nodes are usually tainted so only GPU work lands there
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    if cluster.train_cpu:
        task.set_cpu_request(cluster.train_cpu).set_cpu_limit(cluster.train_cpu)
    if cluster.train_memory:
        task.set_memory_request(cluster.train_memory).set_memory_limit(cluster.train_memory)
    return task
