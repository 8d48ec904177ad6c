# syntax=docker/dockerfile:1
# The worker on a GPU host: docker run --gpus all --env-file .env stylelicense-worker
# torch comes from the PyTorch CUDA index (its wheels carry the CUDA runtime libraries); every
# other package is pinned by constraints.txt, as in CI.

FROM python:3.11-slim-bookworm AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
RUN pip install pip==26.3 setuptools==84.2.1 \
 && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY app ./app
COPY adapters ./adapters
COPY domain ./domain
COPY ports ./ports
COPY containers.py ./
RUN pip install -c constraints.txt --no-build-isolation .

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 worker
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/cache/huggingface
RUN mkdir -p /var/cache/huggingface && chown worker /var/cache/huggingface
VOLUME ["/var/cache/huggingface"]
USER worker
WORKDIR /home/worker
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "app"]
CMD ["worker"]
