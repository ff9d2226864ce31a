# make setup | build | test | demo | wheel | clean      (CI runs .ci/run, i.e. `make test`)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The test and demo dependencies; torch 2.14.1 is the CUDA 13 build, CPU kernels run without a GPU.
DEPS   := torch==2.14.1 numpy ninja cmake pybind11 pytest safetensors transformers==5.24.0 tqdm matplotlib \
          packaging fla-core einops setuptools wheel
# The CUTLASS / CuTe headers of the sm_90a kernels (csrc/cuda/sm90): headers only, so without the
# package's Python dependencies (cuda-python, scipy, ...)
HEADERS := nvidia-cutlass==4.2.0
STAMP  := $(VENV)/.ahn_ops-deps
EDITABLE := $(VENV)/.ahn_ops-editable
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup build test demo wheel clean

setup: $(EDITABLE)

$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-deps $(HEADERS)
	touch $@

# pip install -e registers the package (and ahn-merge); `build` keeps _C up to date afterwards.
$(EDITABLE): $(STAMP) pyproject.toml setup.py
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental: ninja recompiles only what changed in csrc/ (a no-op takes a few seconds).
build: setup
	$(PY) setup.py -q build_ext --inplace

test: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The main job: a small Qwen2.5-architecture model, patched vs unpatched, as the context grows;
# then one AHN attention block at growing context against full attention; then retrieval beyond the
# window with the shipped demo weights (assets/retrieval_demo, written by python/retrieval_demo.py).
demo: build
	$(PY) python/demo_model.py
	$(PY) python/demo.py
	$(PY) python/retrieval_check.py

wheel: setup
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info ahn_ops/_C*.so $(EDITABLE)
