"""lesionflow: lesion segmentation pipelines on Kubeflow, with DVC datasets and MLflow lineage."""

import os

__version__ = "0.1.0"

# The one container image every pipeline component and every chart workload runs in (Dockerfile,
# charts/lesionflow/values.yaml). The checked-in pipeline YAML uses the version tag so it does not
# drift per commit; `lesionflow compile --image REF` (or LESIONFLOW_IMAGE at import) pins another,
# e.g. the `<version>-<gitsha>` tag scripts/build_image.sh pushes.
IMAGE_REPOSITORY = "ghcr.io/lesionflow/lesionflow"
IMAGE = os.environ.get("LESIONFLOW_IMAGE") or f"{IMAGE_REPOSITORY}:{__version__}"
