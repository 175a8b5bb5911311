# The two commands the README promises: `make serve` and `make test`.
# Both create (or reuse) .venv and install what is missing; nothing else is needed on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loraplex-installed
PYTEST_ARGS ?=

.PHONY: install tools serve prepare-model test test-slow test-gpu bench-cpu clean

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

# promtool (Prometheus' config and rules checker, for tests/test_deploy_prometheus.py) is no pip
# package: it is taken from Debian's `prometheus` package, unpacked into the venv (nothing is
# installed or started system-wide). Where that fails, the test says so and fails.
PROMTOOL := $(VENV)/bin/promtool
$(PROMTOOL): | $(PY)
	@if command -v promtool >/dev/null; then ln -sf "$$(command -v promtool)" $@; \
	elif command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then \
	  tmp=$$(mktemp -d) && chmod 755 $$tmp && \
	  { (cd $$tmp && apt-get download -qq prometheus 2>/dev/null) || \
	    { apt-get update -qq && (cd $$tmp && apt-get download -qq prometheus 2>/dev/null); }; } && \
	  dpkg-deb -x $$tmp/prometheus_*.deb $$tmp/x && cp $$tmp/x/usr/bin/promtool $@; \
	  rm -rf $$tmp; \
	fi; test -x $@ || echo "warning: promtool not found; tests/test_deploy_prometheus.py will fail until it is on PATH"

tools: $(PROMTOOL)

prepare-model: $(STAMP)
	$(VENV)/bin/loraplex prepare-model

serve: $(STAMP)
	$(VENV)/bin/loraplex serve

# CI's command. The default model is prepared once (cached under $$LORAPLEX_HOME) because
# the equivalence tests run on it; Triton kernels run under the CPU interpreter.
test: $(STAMP) $(PROMTOOL)
	$(VENV)/bin/loraplex prepare-model
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

bench-cpu: $(STAMP)
	$(PY) loadtest/bench_cpu_generate.py

clean:
	rm -rf $(VENV) build *.egg-info
