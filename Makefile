# One virtual environment for everything; torch is installed first and pinned so that no install
# step can pull the multi-GB CUDA wheels by accident (override TORCH_SPEC on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
export NSLENS_HOME ?= $(CURDIR)/.cache/nslens
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test lint bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/nslens demo

test: venv
	$(PY) -m pytest tests

lint: venv
	$(VENV)/bin/ruff check nslens tests experiments benchmarks

BENCHES := bench_record bench_erasure bench_side_effects bench_memory

bench: venv
	for b in $(BENCHES); do $(PY) benchmarks/$$b.py || exit 1; done

bench-quick: venv
	for b in $(BENCHES); do $(PY) benchmarks/$$b.py --quick || exit 1; done

clean:
	rm -rf $(VENV) .cache .pytest_cache
