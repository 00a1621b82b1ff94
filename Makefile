# `make demo` and `make test` bootstrap .venv themselves on a fresh machine.
# GPU clusters: override TORCH_SPEC with the CUDA build matching the driver, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_CUDA_SPEC ?= torch==2.13.0+cu128 --index-url https://download.pytorch.org/whl/cu128
WORKDIR ?= demo-work
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-heavy bench gpu-check stack-up stack-down clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,bench]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/vidray demo --workdir $(WORKDIR)

# `make test`: everything but the slow end-to-end cases (marked heavy); `make test-heavy`: those;
# CI (.ci/run) runs both.
test: setup
	$(BIN)/python -m pytest -m "not heavy" $(PYTEST_ARGS)

test-heavy: setup
	$(BIN)/python -m pytest -m heavy $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks all

# The GPU figures (benchmarks/gpu_check.py: bf16 steps, MFU, compiled step, extraction per GPU) into
# BENCHMARKS.md; first swaps in torch's CUDA build (TORCH_CUDA_SPEC) where the installed one sees
# no device. `python -m benchmarks gpu_check --dry-run` checks it on CPU (the tests run that).
gpu-check: setup
	$(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || \
		$(BIN)/pip install -q $(TORCH_CUDA_SPEC)
	$(BIN)/python -m benchmarks gpu_check

stack-up: setup
	$(BIN)/vidray stack up

stack-down: setup
	$(BIN)/vidray stack down

clean:
	rm -rf $(WORKDIR) .pytest_cache
