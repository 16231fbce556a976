# The two commands of the README, and a few more. Both create and reuse .venv and
# install what they need (Python packages, and the Debian packages tests drive).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/system-packages.sh | sha1sum | cut -c1-12)

.PHONY: demo test lint typecheck pytest bench schemas clean-venv

$(STAMP): pyproject.toml scripts/system-packages.sh
	scripts/system-packages.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/shoal demo $(DEMO_ARGS)

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy -p shoal -p tests -p bench

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

schemas: $(STAMP)
	$(BIN)/shoal schema export schemas/json

clean-venv:
	rm -rf $(VENV)
