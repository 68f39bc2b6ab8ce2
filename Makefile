# tickserve: `make demo` runs the whole loop, `make test` the test suite (both set up .venv).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check bench bench-ci fuzz quarantine install clean up down weekly

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tickserve demo

test: $(STAMP)
	$(MAKE) check
	$(PY) -m pytest

check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -p no:cacheprovider

quarantine: $(STAMP)
	$(PY) -m pytest -m quarantine

bench-ci: $(STAMP)
	$(PY) -m bench.ci

# nightly: the tick scanner under atheris, a fixed number of inputs from a fixed seed;
# a disagreement with the per-record decoder stops it and leaves the input as crash-*
FUZZ_RUNS ?= 200000
fuzz: $(STAMP)
	$(PY) -m bench.fuzz_scanner -runs=$(FUZZ_RUNS) -seed=1

# The weekly pipeline of .github/workflows/weekly-train.yml, here: data from the DVC remote,
# the stages, then the gate, which moves the champion alias only on a pass (else exit 1).
# MLflow and the archive are MLFLOW_TRACKING_URI/TICKSERVE_* or the stages' .tickserve-dvc/.
MIN_ACCURACY ?= 0.54
MIN_SHARPE ?= 1.0
weekly: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc pull
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro
	TICKSERVE_STATE_DIR="$${TICKSERVE_STATE_DIR:-.tickserve-dvc}" $(VENV)/bin/tickserve validate \
		--min-accuracy $(MIN_ACCURACY) --min-sharpe $(MIN_SHARPE) --metrics-out metrics/validate.json

up: $(STAMP)
	$(VENV)/bin/tickserve up

down: $(STAMP)
	$(VENV)/bin/tickserve down

clean:
	-$(VENV)/bin/tickserve down
	rm -rf .tickserve
