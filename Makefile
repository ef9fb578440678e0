# make demo: create .venv (first time), install, run the offline demo study.
# make test: create .venv (first time), install with dev extras, run the whole suite.
# make test-fast: the suite without the end-to-end tests marked slow (under 90 s on 2 cores).
# make lint: formatting, lint and type checks (what CI runs before the tests).
# make bench-search: the search-efficiency benchmark (about 26 min on 2 cores).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo pareto test test-fast lint clean bench-search

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python -m search run recipes/digits.yaml

pareto: $(VENV)/.installed
	$(BIN)/python -m search run recipes/digits_pareto.yaml
	$(BIN)/python -m search report digits_pareto

# Compute to the winner: whole studies of each strategy under one budget (docs/search-efficiency.md).
bench-search: $(VENV)/.installed-dev
	$(BIN)/python scripts/bench_search.py

# JOBS=2: pytest-xdist over 2 processes, test by test, an idle one taking tests from the other's queue
# (expensive fixtures are built once per run: tests/conftest.py built_once). CI runs JOBS=2 (.ci/run) and
# prints the 15 slowest tests; a plain `make test` keeps one process, the simplest to read.
JOBS ?= 1
XDIST = $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist worksteal)
DURATIONS ?= 0

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q $(XDIST) $(if $(filter-out 0,$(DURATIONS)),--durations=$(DURATIONS))

test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow"

# Commit subjects of 72 characters at most, checked from this commit on (older history stays as it is);
# skipped where that commit is not in the clone.
SUBJECTS_SINCE := 7a5aa530d9b9d11fe647add8eadf2737c30f8ae6

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check search tests scripts
	$(BIN)/ruff check search tests scripts
	$(BIN)/mypy search
	@git log --format=%s $(SUBJECTS_SINCE)..HEAD 2>/dev/null \
		| awk 'length > 72 { print "commit subject over 72 characters: " $$0; bad = 1 } END { exit bad }'

clean:
	rm -rf $(VENV) studies/*.db studies/*/
