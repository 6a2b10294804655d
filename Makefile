# EASE developer commands. `make test` is what CI runs (.ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-full lint format bench clean

setup: $(VENV)/.installed

# torch first, pinned: otherwise pip picks the newest CUDA build (several GB).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,postgres,hf,loggers,slurm]'
	touch $@

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-full: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
