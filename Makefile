# Two commands do all set-up: `make demo` and `make test` (README.md); `make setup` only installs
# (requirements.txt and requirements-test.txt into .venv), running nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# MedMNIST files: $MEDMNIST_ROOT when set; else an offline copy at OFFLINE_MEDMNIST when it holds the
# files (scripts/demo.sh looks in the same place); else medmnist's ~/.medmnist, downloading what is missing.
OFFLINE_MEDMNIST ?= ../shared/data/medmnist
ifneq ($(wildcard $(OFFLINE_MEDMNIST)/pneumoniamnist.npz),)
export MEDMNIST_ROOT ?= $(abspath $(OFFLINE_MEDMNIST))
endif

.PHONY: setup demo test bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# the tests also check the methods' losses against lightly's
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed-test

demo: $(VENV)/.installed
	PY=$(PY) bash scripts/demo.sh

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_speed.py --out runs/bench-speed/speed.json
	$(PY) benchmarks/bench_resources.py --out runs/bench-resources
	$(PY) benchmarks/bench_byol_step.py
