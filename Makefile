# Quick start: `make run` (set up + dvc repro on the demo), `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: setup
	dvc repro

test: setup
	pytest

bench: setup
	python bench/bench.py

clean:
	rm -rf $(VENV)
