# syntax=docker/dockerfile:1
# The one lesionflow image. KFP components (lesionflow.IMAGE), the serving Deployment, the retrain
# CronJob and the MLflow tracking server of charts/lesionflow all run from it.
# Build and push: scripts/build_image.sh (tags <version> and <version>-<gitsha>); docs/deploy.md.
#
# CPU torch by default. GPU: --build-arg TORCH_VARIANT=cu128 (torch's CUDA wheels carry the CUDA
# runtime; nodes supply the driver); BASE_IMAGE may be swapped for a CUDA base that has Python ≥ 3.11
# as `python3` (both stages use it, so the venv's interpreter exists at run time).
# Pin BASE_IMAGE by digest for releases: --build-arg BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:…

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/lesionflow/bin:$PATH
RUN python3 -m venv /opt/lesionflow
# torch first, from its own index: PyPI's default Linux torch is the multi-GB CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY lesionflow ./lesionflow
COPY components ./components
COPY pipelines ./pipelines
# The same pins as CI (constraints.txt); [server] adds the MLflow server's PostgreSQL driver.
RUN pip install -c constraints.txt ".[server]"

FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="lesionflow" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.source="https://github.com/lesionflow/lesionflow"
RUN groupadd --system --gid 10001 lesionflow \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/lesionflow \
      --shell /usr/sbin/nologin lesionflow
COPY --from=build /opt/lesionflow /opt/lesionflow
WORKDIR /app
COPY params.yaml ./
# KFP runs `sh -c "python3 -m kfp.dsl.executor_main ..."`: the venv's python3 must come first.
# LESIONFLOW_GIT_SHA is the code version the registry records when there is no git checkout.
ENV PATH=/opt/lesionflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    LESIONFLOW_GIT_SHA=${GIT_SHA}
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["lesionflow"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
