# medseg developer commands. `make demo` and `make test` work on a fresh machine (they run `make install`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MEDSEG := $(VENV)/bin/medseg
DEMO_DIR ?= demo_out
# Without an NVIDIA GPU, pin the CPU build of torch so that no multi-GB CUDA wheels are pulled.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints-cpu.txt)
PYTEST_ARGS ?= -q -m "not slow"

.PHONY: install test test-all demo lint image-local clean gpu-suite gpu-suite-quick nnunet-venv

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check medseg tests benchmarks datasets
	$(VENV)/bin/hadolint docker/Dockerfile docker/Containerfile.smoke

# Build the CPU image with podman (no Docker engine needed) and run the smoke test inside it (slow, minutes).
image-local:
	nice -n 19 bash docker/build-local.sh

# The GPU validation and benchmark suite (docs/gpu.md): `make gpu-suite` on a GPU server, a report in gpu_suite_report/.
gpu-suite: install
	$(PY) -m pip install -q -r requirements-gpu.txt
	$(PY) benchmarks/gpu_suite.py --device cuda $(GPU_SUITE_ARGS)

gpu-suite-quick: install
	$(PY) benchmarks/gpu_suite.py --device cpu --quick $(GPU_SUITE_ARGS)

# nnU-Net v2 in its own venv, for the suite's and benchmarks' nnU-Net rows
nnunet-venv:
	test -x .venv-nnunet/bin/python || $(PYTHON) -m venv .venv-nnunet
	.venv-nnunet/bin/python -m pip install -q $(CONSTRAINTS) -r requirements-nnunet.txt

demo: install
	bash scripts/demo.sh $(MEDSEG) $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
