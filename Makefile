# Two commands do all set-up: `make demo` and `make test` (README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Use the MedMNIST files beside the project when they are there (offline machines, CI);
# otherwise MEDMNIST_ROOT or medmnist's default folder, downloading what is missing.
ifneq ($(wildcard ../shared/data/medmnist/pneumoniamnist.npz),)
export MEDMNIST_ROOT ?= $(abspath ../shared/data/medmnist)
endif

.PHONY: demo test bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	PY=$(PY) bash scripts/demo.sh

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_speed.py --out runs/bench-speed/speed.json
	$(PY) benchmarks/bench_resources.py --out runs/bench-resources
	$(PY) benchmarks/bench_byol_step.py
