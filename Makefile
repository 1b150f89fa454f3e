# Two commands do everything on a fresh Linux machine with Python 3.11:
#   make demo   - create .venv, install, start the local Serve app (building its offline test checkpoints),
#                 rerank the model card's example over HTTP with evidence, shut down
#   make test   - same install, then the whole test suite (.ci/run calls exactly this)
#   make test-fast - the Ray-free, non-slow tests (under a minute); make lint - ruff
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: install demo test test-fast lint bench browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: on our machines 2.13.0 is a local CPU build; elsewhere pip fetches it.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m deployments.demo deployments/local.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not cluster and not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_engines.py --preset 0.8b
	$(PY) benchmarks/bench_engines.py --preset 0.8b --dtype auto
	$(PY) benchmarks/bench_engines.py --preset 0.8b --evidence
	$(PY) benchmarks/bench_kernels.py --preset 0.8b
	$(PY) benchmarks/bench_packing.py --preset 0.8b
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_evidence_serve.py
	$(PY) benchmarks/bench_batch.py
	$(PY) benchmarks/bench_tokenize.py
	$(PY) benchmarks/bench_linear.py
	$(PY) benchmarks/bench_prefill.py --preset 0.8b

# The playground test's headless browser (Debian's chromium; needs root).
browser:
	command -v chromium >/dev/null || apt-get install -y chromium || (apt-get update && apt-get install -y chromium)

clean:
	rm -rf $(VENV) checkpoints
