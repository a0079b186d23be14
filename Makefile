# The same steps CI runs (.ci/run), for people.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKSPACE ?= .
# The PostgreSQL `make run` ships to: the local server's `postgres` database by default.
ACODE_POSTGRES_URL ?= postgresql://postgres@127.0.0.1:5432/postgres

.PHONY: run test lint bench deb clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Create (or upgrade) the workspace database of $(WORKSPACE), show it, then run the daemon
# in the foreground on that workspace (no config file: it syncs the current directory's
# workspace). Ctrl-C stops it after in-flight batches commit.
run: $(BIN)/.installed
	$(BIN)/acode db migrate --workspace $(WORKSPACE)
	$(BIN)/acode db status --workspace $(WORKSPACE)
	cd $(WORKSPACE) && ACODE_POSTGRES_URL=$(ACODE_POSTGRES_URL) $(abspath $(BIN))/acode-syncd run

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
