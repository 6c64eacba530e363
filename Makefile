# The two commands a newcomer needs:
#   make demo   set up .venv (if missing) and run the main job on the bundled defaults
#   make test   set up .venv (if missing) and run the test suite
#
# torch is installed first and pinned (TORCH=torch==2.13.0 takes the CPU build on our machines). For an NVIDIA
# GPU pick the CUDA build of the same release, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlhfkit-installed

.PHONY: setup demo test test-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhfkit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf runs .pytest_cache
