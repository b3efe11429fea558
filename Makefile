# Set-up and the two first commands of the README: `make demo` and `make test`.
# CUDA users: make demo TORCH='torch==2.6.0' TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= deepspeed,test
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

# torch first: anything that pulls torch by itself would download a CUDA build.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/dapo-lightning fit --config configs/demo.yaml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks (CPU figures in the README): TRL goes in the optional [bench] extra, never in the core dependencies.
bench: setup
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),bench]"
	OMP_NUM_THREADS=1 $(PY) benchmarks/attention_overhead.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/peer_trl.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/demo_seeds.py
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.soak

clean:
	rm -rf $(VENV) .cache runs
