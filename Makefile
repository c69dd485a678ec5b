PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-small clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python manifests/make_demo_data.py demo_work
	$(BIN)/soma-manifest validate manifests/demo.yaml
	$(BIN)/soma-manifest plan manifests/demo.yaml
	$(BIN)/soma-manifest apply manifests/demo.yaml
	$(BIN)/soma-manifest show manifests/demo.yaml --summary

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

bench-small: $(STAMP)
	$(BIN)/python bench/run.py --preset small

bench: $(STAMP)
	$(BIN)/python bench/run.py --preset full

clean:
	rm -rf demo_work .pytest_cache
