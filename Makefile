# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both run `setup`, which builds .venv/ once and is a no-op while pyproject.toml and
# constraints.txt are unchanged.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo generate worker test test-unit test-integration bench bench-gpu lint format docs lock clean mutation mutation-recheck mutation-clean

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
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -r bench/requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r bench/requirements-nodeps.txt
	$(PY) -m bench.worker_throughput
	$(PY) -m bench.lora_cpu
	$(PY) -m bench.provenance_cost
	$(PY) -m bench.provenance_robustness
	$(PY) -m bench.parked_tool

# On a machine with a CUDA GPU: plain diffusers fp16 against the tuned adapter (bench/results/gpu.json).
bench-gpu: setup
	$(PY) -m bench.gpu

lint: setup
	$(PY) -m black --check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pylint app domain ports adapters containers.py bench tools
	$(PY) -m pylint tests --disable=missing-function-docstring,missing-class-docstring,redefined-outer-name,duplicate-code
	$(VENV)/bin/hadolint Dockerfile

format: setup
	$(PY) -m black .

# The generated parts of docs/ (every setting, every error code, every metric), rendered from the
# code; tests/unit/test_docs.py and test_metrics.py fail while one differs from the rendering.
docs: setup
	$(PY) -m tools.docs_tables
	$(PY) -m adapters.prometheus.docs > docs/metrics.md

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

# Mutation testing of domain/ and ports/ against tests/unit ([tool.mutmut] in pyproject.toml).
# Score: (killed + timed out) / (mutants - those in tools/mutation_equivalents.txt), tools/mutation_report.py.
# Results stay in mutants/, so a rerun only tests mutants of functions changed since; for the
# score of record start clean: make mutation-clean mutation. Progress goes to build/mutmut.log.
# A fixed hash seed keeps the order of each mutant's tests, hence killed vs timeout, repeatable.
# More children than cores: a mutant that hangs holds its slot, idle, until its time limit.
MUTATION_JOBS ?= 6
MUTATION_MIN_SCORE ?= 95
MUTMUT := PYTHONHASHSEED=0 nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS)

mutation: setup
	@mkdir -p build
	$(MUTMUT) > build/mutmut.log 2>&1 || { tr '\r' '\n' < build/mutmut.log | tail -n 40; exit 1; }
	$(PY) tools/mutation_report.py --list survived --list timeout --list suspicious --count-timeouts \
	  --fail-under $(MUTATION_MIN_SCORE)

# Runs the mutants that timed out once more: a real hang times out again, a busy machine not.
mutation-recheck: setup
	@mkdir -p build
	ids="$$($(PY) tools/mutation_report.py --ids --list timeout)"; [ -z "$$ids" ] || \
	  $(MUTMUT) $$ids > build/mutmut-recheck.log 2>&1
	$(PY) tools/mutation_report.py --list timeout --count-timeouts

mutation-clean:
	rm -rf mutants

clean:
	rm -rf $(VENV) build output .pytest_cache mutants
