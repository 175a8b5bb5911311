# The two commands the README promises: `make serve` and `make test`.
# Both create (or reuse) .venv and install what is missing; nothing else is needed on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loraplex-installed
PYTEST_ARGS ?=

.PHONY: install serve prepare-model test test-slow test-gpu bench-cpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch goes first and pinned: on the CPU machines this takes the local CPU wheel; a loose range
# resolved by another package would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

prepare-model: $(STAMP)
	$(VENV)/bin/loraplex prepare-model

serve: $(STAMP)
	$(VENV)/bin/loraplex serve

# CI's command. The default model is prepared once (cached under $$LORAPLEX_HOME) because
# the equivalence tests run on it; Triton kernels run under the CPU interpreter.
test: $(STAMP)
	$(VENV)/bin/loraplex prepare-model
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

bench-cpu: $(STAMP)
	$(PY) loadtest/bench_cpu_generate.py

clean:
	rm -rf $(VENV) build *.egg-info
