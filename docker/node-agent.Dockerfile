# syntax=docker/dockerfile:1.7
# The amp4ec node-agent image: shard Pods and the monitor DaemonSet. CPU torch.
#
# Needs Docker with buildx; not built in CI (no Docker engine there). tests/deploy/test_images.py
# checks by reading that it installs the extras, pins and code the tests run.
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -f docker/node-agent.Dockerfile -t ghcr.io/amp4ec/node-agent:0.1.0 --push .
#
# torch comes first, from PyTorch's CPU index (a PyPI torch on amd64 is a multi-GB CUDA
# build); the "agent" extra then finds its torch==2.13.0 pin satisfied and installs the rest
# from PyPI. The CPU index has wheels for amd64 and arm64 (aarch64), so both build the same way.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY amp4ec ./amp4ec
RUN pip install ".[agent]" \
 && python -c "import torch, amp4ec.node_agent.cli; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}'; assert not torch.cuda.is_available()" \
 && python -m compileall -q /opt/venv

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="amp4ec-node-agent" \
      org.opencontainers.image.description="amp4ec node agent: a shard of a model over gRPC, or the node monitor" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
# HOME and caches under /tmp: the chart keeps the root filesystem read-only and mounts an emptyDir there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch
USER 65532:65532
WORKDIR /tmp
EXPOSE 50051 9090
ENTRYPOINT ["python", "-m", "amp4ec.node_agent"]
