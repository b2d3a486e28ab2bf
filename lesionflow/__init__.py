"""lesionflow: lesion segmentation pipelines on Kubeflow, with DVC datasets and MLflow lineage."""

__version__ = "0.1.0"

# The one container image every pipeline component runs in (see Dockerfile / charts).
IMAGE = f"ghcr.io/lesionflow/lesionflow:{__version__}"
