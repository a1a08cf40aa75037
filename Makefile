# make demo: the main job.  make test: the test suite.  Both create and reuse .venv.
# make test-core: the suite again in .venv-core, which holds torch and safetensors alone
# (DESIGN.md section 2: core and methods need nothing else). With PEFTKIT_CORE_ONLY=1,
# tests/conftest.py checks that no optional package is installed and skips what needs one.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORE_VENV := .venv-core
CORE_BIN := $(CORE_VENV)/bin
CORE_STAMP := $(CORE_VENV)/.installed

.PHONY: demo test test-core lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU build that this machine has on disk; pyproject stays permissive.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The same torch as .venv; then safetensors (its torch extra brings numpy) and pytest, and
# peftkit without its dependencies.
$(CORE_BIN)/python:
	$(PY) -m venv $(CORE_VENV)

$(CORE_STAMP): pyproject.toml | $(CORE_BIN)/python
	$(CORE_BIN)/python -m pip install -q --upgrade pip
	$(CORE_BIN)/python -m pip install -q torch==2.13.0
	$(CORE_BIN)/python -m pip install -q "safetensors[torch]" pytest
	$(CORE_BIN)/python -m pip install -q --no-deps -e .
	touch $(CORE_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/peftkit train examples/demo.yaml --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest tests -ra

test-core: $(CORE_STAMP)
	PEFTKIT_CORE_ONLY=1 $(CORE_BIN)/python -m pytest tests -ra

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples

clean:
	rm -rf $(VENV) $(CORE_VENV) build *.egg-info src/*.egg-info
