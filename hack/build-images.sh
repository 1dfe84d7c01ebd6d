#!/usr/bin/env bash
# Build both images (operator, node agent) for amd64 and arm64 and push them to a registry.
#
# Needs Docker with buildx and, on an amd64 machine, QEMU for arm64 (docker/setup-qemu-action in
# CI, or `docker run --privileged --rm tonistiigi/binfmt --install arm64` once); not run in CI
# here (no Docker engine). The release workflow (.github/workflows/release.yml) runs this script.
#
# Usage: hack/build-images.sh REGISTRY [TAG]
#   REGISTRY  where the images go, e.g. registry.example.com/ml (→ REGISTRY/operator, REGISTRY/node-agent)
#   TAG       default: the version in pyproject.toml (the chart's appVersion, so no tag value is needed)
#   PLATFORMS=linux/amd64,linux/arm64 (default)   PUSH=0: build only, no push (checks the build)
# Then point the chart at them: docs/install.md.

set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
registry=${1:?usage: hack/build-images.sh REGISTRY [TAG]}
tag=${2:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
platforms=${PLATFORMS:-linux/amd64,linux/arm64}
output=--push
[ "${PUSH:-1}" = 0 ] && output=--output=type=cacheonly
command -v docker >/dev/null || { echo "build-images: docker (with buildx) is required" >&2; exit 1; }
docker buildx inspect amp4ec >/dev/null 2>&1 || docker buildx create --name amp4ec --driver docker-container >/dev/null
for image in operator node-agent; do
  echo "== $registry/$image:$tag ($platforms)"
  docker buildx build --builder amp4ec --platform "$platforms" \
    -f "docker/$image.Dockerfile" -t "$registry/$image:$tag" $output .
done
