# The README's two commands: `make bench` (set up, then the main job) and `make test` (set up, then the tests).
# Both create .venv and install what they need: on a machine without a GPU, the CPU torch 2.13.0 (taken from
# local disk here) plus triton for the interpreter; on a machine whose python already has a CUDA torch, that
# torch (and its triton) through --system-site-packages. The C++ extension is built against that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastcdml-installed

.PHONY: setup test bench demo clean gpu-check compile-check
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	@if $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
		echo "fastcdml: using the CUDA torch already installed"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q ninja pybind11 'triton>=3.2'
	$(PY) -m pip install -q --no-build-isolation -e '.[test,demo,bench]'
	$(PY) -m fastcdml info
	touch $@

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench

demo: setup
	$(PY) examples/demo.py

# One NVIDIA GPU, the CUDA torch and triton already installed, no network: installs nothing (no setup step), runs
# the tests, the GPU benchmark preset and a CCL config sweep into OUT (bench/gpu_check.py says how to bring
# wheels as files: WHEELS=dir). ARGS=--dry-run exercises it on a CPU.
OUT ?= gpu-check-out
gpu-check:
	$(PYTHON) -m bench.gpu_check --out $(OUT) $(if $(WHEELS),--wheels $(WHEELS)) $(ARGS)

# Compile every Triton kernel for sm_90a / sm_80 / sm_86 without a GPU and enforce the gates.
compile-check: setup
	$(PY) -m fastcdml compile-check --gates $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info fastcdml/_C*.so
