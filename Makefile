PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-small clean constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The test environment installs the versions in constraints.txt (every package, pinned: what CI last passed
# with), so that `make test` resolves nothing new and never backtracks. `make constraints` re-resolves them from
# pyproject.toml in a fresh venv; commit the result once `make test` passes with it.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python manifests/make_demo_data.py demo_work
	$(BIN)/soma-manifest validate manifests/demo.yaml
	$(BIN)/soma-manifest plan manifests/demo.yaml
	$(BIN)/soma-manifest apply manifests/demo.yaml
	$(BIN)/soma-manifest show manifests/demo.yaml --summary

test: $(STAMP)
	bash tests/ensure_chromium.sh  # the report's browser test; installs Debian's chromium only if absent
	$(BIN)/python -m pytest -n 2 --dist worksteal -q --durations=15  # the slowest tests, for whoever keeps the suite fast

bench-small: $(STAMP)
	$(BIN)/python bench/run.py --preset small

bench: $(STAMP)
	$(BIN)/python bench/run.py --preset full

LOCK_VENV := .venv-constraints

constraints:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[test]'
	{ echo "# pip freeze of '.[test]' resolved in a fresh venv by \`make constraints\` (Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'))"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf demo_work .pytest_cache
