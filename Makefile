# acp-data: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds that install offline on the project's machines; override for your CUDA.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.acp-setup-stamp
PYTEST_ARGS ?=

.PHONY: setup test bench lint demo clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml tools/install_detectron2.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip setuptools wheel
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[gen,dev]"
	$(PY) tools/install_detectron2.py
	@touch $(STAMP)

test: setup
	bash tools/run_tests.sh $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/cache_bench.py
	$(PY) benchmarks/clis_bench.py
	$(PY) benchmarks/prebuild_bench.py
	$(PY) benchmarks/loader_bench.py
	$(PY) benchmarks/eval_bench.py

lint: setup
	$(VENV)/bin/ruff check acp_data tools tests benchmarks

demo: setup
	$(PY) -m acp_data.shapes.demo

clean-venv:
	rm -rf $(VENV)
