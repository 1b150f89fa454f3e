# Two commands do everything on a fresh Linux machine with Python 3.11:
#   make demo   - create .venv, install, build the offline test checkpoint, rerank the model card's example
#   make test   - same install, then the whole test suite (.ci/run calls exactly this)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CKPT   := checkpoints/tiny

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: on our machines 2.13.0 is a local CPU build; elsewhere pip fetches it.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

$(CKPT)/config.json: $(VENV)/.installed
	$(VENV)/bin/prism-ray checkpoint build --preset tiny --out $(CKPT)

demo: $(CKPT)/config.json
	$(VENV)/bin/prism-ray demo --model $(CKPT)

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_engines.py

clean:
	rm -rf $(VENV) checkpoints
