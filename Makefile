# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both run `setup`, which builds .venv/ once and is a no-op while pyproject.toml and
# constraints.txt are unchanged.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo generate worker test test-unit test-integration bench bench-gpu lint format lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check pip==26.3 setuptools==84.2.1
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m app demo

worker: setup
	$(PY) -m app worker

# The integration tests need RabbitMQ and an S3 API: services.py starts the local RabbitMQ if it
# is down and a moto_server on a free port, and exports their endpoints (testcontainers starts
# RabbitMQ and MinIO instead where a Docker engine answers).
WITH_SERVICES := $(PY) -m tests.integration.services

test: setup
	$(WITH_SERVICES) $(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: setup
	$(WITH_SERVICES) $(PY) -m pytest tests/integration

# Benchmarks print ratios measured side by side in one run (this machine is shared and noisy).
bench: setup
	$(PY) -m bench.worker_throughput
	$(PY) -m bench.lora_cpu

# On a machine with a CUDA GPU: plain diffusers fp16 against the tuned adapter (bench/results/gpu.json).
bench-gpu: setup
	$(PY) -m bench.gpu

lint: setup
	$(PY) -m black --check .
	$(PY) -m pylint app domain ports adapters containers.py bench
	$(PY) -m pylint tests --disable=missing-function-docstring,missing-class-docstring,redefined-outer-name,duplicate-code
	$(VENV)/bin/hadolint Dockerfile

format: setup
	$(PY) -m black .

# Re-pin constraints.txt from a clean resolve of pyproject.toml (needs the package index).
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install -q pip==26.3 setuptools==84.2.1
	build/lock-venv/bin/pip install -q torch==2.13.0 -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; echo pip==26.3; echo setuptools==84.2.1; \
	  build/lock-venv/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf build/lock-venv

clean:
	rm -rf $(VENV) build output .pytest_cache
