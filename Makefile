# Set-up and the two first commands of the README: `make demo` and `make test`.
# CUDA users: make demo TORCH='torch==2.6.0' TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= deepspeed,test
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The demo's tiny model runs kernels too small to share between threads: one thread costs ~10% when the machine is
# idle (100 steps: 10.1-10.8 s against 9.2-9.6 s with 2) and saves ~5x when another job holds a core (OpenMP's
# threads wait for each other: 213 s against 43 s of training, measured on a busy 2-core machine).
DEMO_THREADS ?= 1

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
	OMP_NUM_THREADS=$(DEMO_THREADS) $(VENV)/bin/dapo-lightning fit --config configs/demo.yaml

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
