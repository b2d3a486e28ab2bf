#!/usr/bin/env bash
# Build the lesionflow image and tag it <version> (what the checked-in pipeline YAML and the chart
# default to) and <version>-<gitsha> (immutable: pin deployments and compiled pipelines to it).
#
#   scripts/build_image.sh [--push] [--dry-run] [--allow-dirty] [-- extra `docker build` args]
#
# IMAGE_REPOSITORY (default lesionflow.IMAGE_REPOSITORY) and DOCKER (docker, podman, …) are read
# from the environment. --dry-run prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

push=0 run="" allow_dirty=0
while [ $# -gt 0 ]; do
  case $1 in
    --push) push=1 ;;
    --dry-run) run=echo ;;
    --allow-dirty) allow_dirty=1 ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

read -r version default_repo < <(python3 -c 'import sys; sys.path.insert(0, "."); import lesionflow as l; print(l.__version__, l.IMAGE_REPOSITORY)')
repo=${IMAGE_REPOSITORY:-$default_repo}
sha=$(git rev-parse HEAD)
# A sha tag must name exactly the committed code.
if [ "$allow_dirty" = 0 ] && [ -n "$(git status --porcelain -- Dockerfile pyproject.toml constraints.txt params.yaml lesionflow components pipelines)" ]; then
  echo "uncommitted changes under the image's sources: commit them or pass --allow-dirty" >&2
  exit 1
fi

DOCKER=${DOCKER:-docker}
$run "$DOCKER" build --build-arg VERSION="$version" --build-arg GIT_SHA="$sha" \
  -t "$repo:$version" -t "$repo:$version-${sha:0:12}" "$@" .
if [ "$push" = 1 ]; then
  $run "$DOCKER" push "$repo:$version"
  $run "$DOCKER" push "$repo:$version-${sha:0:12}"
fi
echo "pin this build: lesionflow compile --image $repo:$version-${sha:0:12}; helm … --set image.tag=$version-${sha:0:12}"
