# The same steps CI runs (.ci/run), for people.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKSPACE ?= .

.PHONY: run test lint bench deb clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Create (or upgrade) the workspace database of $(WORKSPACE) and show its status.
run: $(BIN)/.installed
	$(BIN)/acode db migrate --workspace $(WORKSPACE)
	$(BIN)/acode db status --workspace $(WORKSPACE)

test: $(BIN)/.installed
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python -m tests.bench.bench_store

# The Debian package, dist/acode-sync_VERSION_ARCH.deb (packaging/README.md). It builds its
# own virtual environment with Debian's /usr/bin/python3; it does not use $(VENV).
deb:
	packaging/build-deb

clean:
	rm -rf $(VENV) dist .coverage .coverage.* .mypy_cache .ruff_cache .pytest_cache
