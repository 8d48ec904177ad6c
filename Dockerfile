# syntax=docker/dockerfile:1
# The StyleLicense worker on a GPU host.
#
#   docker build -t stylelicense-worker .
#   docker run --gpus all --env-file .env -p 9100:9100 --stop-timeout 600 stylelicense-worker
#
# CUDA: torch 2.13.0 is published for CUDA 12.6 and 13.0 (stable) and 13.2 (experimental); there is
# no 12.8 build of it. The image takes the cu126 build (Volta to Hopper; an Ada RTX 4090 runs its
# sm_86 kernels) on the matching CUDA 12.6 base: it needs an NVIDIA driver for CUDA 12.6 (R560 or
# newer). For Blackwell cards (sm_100/sm_120) build with the CUDA 13.0 pair instead:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
#   --build-arg CUDA_IMAGE=nvidia/cuda:13.0.<patch>-base-ubuntu24.04
# The base is the CUDA "base" flavour (the CUDA runtime, the driver hooks and NVIDIA_REQUIRE_CUDA
# for the driver check), not "cudnn-runtime": torch's wheel brings its own cuBLAS and cuDNN
# (the nvidia-* wheels it depends on), and a second copy would only add gigabytes.
# Every package other than torch is pinned by constraints.txt, as in CI. Ubuntu 24.04's Python is
# 3.12 (CI runs 3.11); every pin has a wheel for both.
#
# Stopping: SIGTERM makes the worker stop taking jobs, finish the ones it holds (a batch, their
# uploads and webhooks, whose retries may take WEBHOOK_RETRY_BUDGET_SECONDS) and exit. Docker's
# default grace is 10 s before SIGKILL: give it minutes, e.g. `docker run --stop-timeout 600`,
# `docker stop -t 600`, compose `stop_grace_period: 10m`, Kubernetes
# `terminationGracePeriodSeconds: 600` (more on the CPU fallback, where one image takes minutes).
# Jobs cut off by a SIGKILL are not lost: unacked, they go back to the queue.

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Unpinned apt packages on purpose: the Ubuntu archive keeps only current versions (with their
# security fixes); Python packages, the part that matters for behaviour, are pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
RUN pip install pip==26.3 setuptools==84.2.1 \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY app ./app
COPY adapters ./adapters
COPY domain ./domain
COPY ports ./ports
COPY containers.py ./
# constraints.txt pins torch==2.13.0, which the CUDA build (2.13.0+cu126) satisfies: pip keeps it.
RUN pip install -c constraints.txt --no-build-isolation . \
 && pip check \
 && python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('${TORCH_VERSION}+cu') else f'torch {v} is not the CUDA build')"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# python3.12 (the venv's interpreter), DejaVu for text signatures (adapters/fonts.py looks at
# /usr/share/fonts/truetype/dejavu), CA certificates for S3 and the backend over HTTPS, tini as
# PID 1 (forwards SIGTERM, reaps torch.compile's worker processes).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 fonts-dejavu-core ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 worker \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin worker \
 && mkdir -p /var/cache/huggingface /var/cache/stylelicense/loras /var/cache/stylelicense/inductor \
 && chown -R 10001:10001 /var/cache/huggingface /var/cache/stylelicense
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/huggingface \
    LORA_CACHE_DIR=/var/cache/stylelicense/loras \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/stylelicense/inductor \
    SIGNATURE_FONT_PATH=/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9100
# The model weights (HF_HOME, gigabytes), the LoRA cache and torch.compile's kernels
# (TORCHINDUCTOR_CACHE_DIR, with MODEL_COMPILE) outlive the container: mount volumes there so a
# restart neither downloads SD 1.5 again, nor refetches every artist's LoRA, and inductor reuses
# the kernels it generated (dynamo still traces the UNet at each start).
VOLUME ["/var/cache/huggingface", "/var/cache/stylelicense"]
WORKDIR /home/worker
USER 10001:10001
EXPOSE 9100
# /readyz: model loaded, broker connected, storage reachable. The start period covers the first
# download and load of the model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-m", "app", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "app", "worker"]
