# tickserve: `make demo` runs the whole loop, `make test` the test suite (both set up .venv).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check bench bench-ci install clean up down

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

bench-ci: $(STAMP)
	$(PY) -m bench.ci

up: $(STAMP)
	$(VENV)/bin/tickserve up

down: $(STAMP)
	$(VENV)/bin/tickserve down

clean:
	-$(VENV)/bin/tickserve down
	rm -rf .tickserve
