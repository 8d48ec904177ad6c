# syntax=docker/dockerfile:1
# The StyleLicense worker on a GPU host.
#
#   docker build -t stylelicense-worker .
#   docker run --gpus all --env-file .env -p 9100:9100 --stop-timeout 600 stylelicense-worker
#
# Python: the image runs the Python that CI tests. PYTHON_MINOR below is the one place the version
# is set; tests/unit/test_container_files.py fails when it differs from pyproject.toml's black
# target and pylint py-version, and, in CI, from the interpreter running the tests. The base is
# the Docker official image python:<minor>-slim-bookworm in both stages (the venv links to its
# /usr/local/bin/python): upstream CPython, rebuilt with each patch release of the minor (a
# rebuild takes the latest, as apt takes current packages). Debian 12's glibc 2.36 meets every
# wheel installed (c2pa-python's native library and torch are manylinux_2_28).
#
# CUDA: no CUDA base image. torch's CUDA wheel brings the CUDA user-space libraries it was built
# with (cudart, cuBLAS, cuDNN, NCCL, ...: the nvidia-* wheels, pinned exactly by torch), and the
# NVIDIA container toolkit mounts the host driver (libcuda, NVML) into the container, as
# `--gpus` or compose's device reservations ask it to; the NVIDIA_* variables set below are the
# ones the nvidia/cuda images set, so the toolkit treats this image as it treats those.
# torch 2.13.0 is published for CUDA 12.6 and 13.0 (stable) and 13.2 (experimental); there is no
# 12.8 build of it. The image takes the cu126 build (Volta to Hopper; an Ada RTX 4090 runs its
# sm_86 kernels): it needs an NVIDIA driver for CUDA 12.6 (R560 or newer), which the toolkit
# checks at start (NVIDIA_REQUIRE_CUDA) and refuses to run the container on an older driver.
# For Blackwell cards (sm_100/sm_120) build with the CUDA 13.0 pair instead (driver R580+):
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 --build-arg CUDA_VERSION=13.0
# Every package other than torch is pinned by constraints.txt, as in CI.
#
# Stopping: SIGTERM makes the worker stop taking jobs, finish the ones it holds (a batch, their
# uploads and webhooks, whose retries may take WEBHOOK_RETRY_BUDGET_SECONDS) and exit. Docker's
# default grace is 10 s before SIGKILL: give it minutes, e.g. `docker run --stop-timeout 600`,
# `docker stop -t 600`, compose `stop_grace_period: 10m`, Kubernetes
# `terminationGracePeriodSeconds: 600` (more on the CPU fallback, where one image takes minutes).
# Jobs cut off by a SIGKILL are not lost: unacked, they go back to the queue.

ARG PYTHON_MINOR=3.11
ARG CUDA_VERSION=12.6

FROM python:${PYTHON_MINOR}-slim-bookworm AS build
ARG PYTHON_MINOR
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
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
# The checks run on the bare base the runtime shares: the venv's Python is the minor asked for,
# and torch is the CUDA build and imports without system libraries (it bundles its libgomp).
RUN pip install -c constraints.txt --no-build-isolation . \
 && pip check \
 && python -c "import sys; v = '%d.%d' % sys.version_info[:2]; sys.exit(0 if v == '${PYTHON_MINOR}' else f'Python {v} is not ${PYTHON_MINOR}')" \
 && python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('${TORCH_VERSION}+cu') else f'torch {v} is not the CUDA build')"

FROM python:${PYTHON_MINOR}-slim-bookworm
ARG CUDA_VERSION
ENV DEBIAN_FRONTEND=noninteractive
# DejaVu for text signatures (adapters/fonts.py looks at /usr/share/fonts/truetype/dejavu), CA
# certificates for S3 and the backend over HTTPS, tini as PID 1 (forwards SIGTERM, reaps
# torch.compile's worker processes). Python comes with the base, CUDA with torch's wheels.
# Unpinned apt packages on purpose: the Debian archive keeps only current versions (with their
# security fixes); Python packages, the part that matters for behaviour, are pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends fonts-dejavu-core ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 worker \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin worker \
 && mkdir -p /var/cache/huggingface /var/cache/stylelicense/loras /var/cache/stylelicense/inductor \
 && chown -R 10001:10001 /var/cache/huggingface /var/cache/stylelicense
COPY --from=build /opt/venv /opt/venv
# The NVIDIA container toolkit reads NVIDIA_*: every GPU it is given (`--gpus` and compose's
# device_ids narrow it), the driver's compute libraries and NVML (the GPU metrics), and the
# driver check. LD_LIBRARY_PATH is where Kubernetes device plugins (GKE) mount the driver.
ENV PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=${CUDA_VERSION}" \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
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
