# The two commands of the README:  `make demo`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test lint typecheck pytest wheel-check clean

$(BIN)/fedrec: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,text]'
	$(BIN)/pip check
	touch $(BIN)/fedrec

install: $(BIN)/fedrec

## Main job: a small multi-tenant DP simulation on the built-in synthetic data, then a top-10 for a user.
demo: install
	bash scripts/demo.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/python scripts/typecheck_tree.py >/dev/null
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q -p no:cacheprovider --timeout=900 --durations=25

## The installed wheel in a fresh venv, run from a temp dir (no repository on sys.path).
wheel-check: install
	PY=$(PY) bash scripts/wheel_check.sh

## Everything CI runs: lint, types, the whole test suite (slow end-to-end tests included), the wheel.
test: lint typecheck pytest wheel-check

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build
