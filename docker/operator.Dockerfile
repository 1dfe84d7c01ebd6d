# syntax=docker/dockerfile:1.7
# The amp4ec operator image: kopf + the planner + the storage initializer. No torch.
#
# Needs Docker with buildx; not built in CI (no Docker engine there). tests/deploy/test_images.py
# checks by reading that it installs the extras and code the tests run.
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -f docker/operator.Dockerfile -t ghcr.io/amp4ec/operator:0.1.0 --push .
#
# Built from the repository root (the context): the same pyproject.toml and amp4ec/ the tests
# install, as a wheel (never imported from the source tree). Every dependency of the
# "operator" extra has wheels for amd64 and arm64, so the emulated arm64 build compiles nothing.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY amp4ec ./amp4ec
RUN pip install ".[operator]" \
 && python -c "import amp4ec.operator, sys; assert 'torch' not in sys.modules" \
 && python -m compileall -q /opt/venv

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="amp4ec-operator" \
      org.opencontainers.image.description="amp4ec operator (kopf): InferenceDeployment -> shard Pods" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root, numeric (runAsNonRoot can check it); the chart mounts an emptyDir at /tmp and
# keeps the root filesystem read-only.
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 8081
CMD ["kopf", "run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8081/healthz", "-m", "amp4ec.operator"]
