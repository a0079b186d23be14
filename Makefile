# The same steps CI runs (.ci/run), for people.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKSPACE ?= .
# The PostgreSQL `make run` ships to: a database of its own, $(DATABASE), on the local
# server, created if missing. Setting ACODE_POSTGRES_URL points it elsewhere (and creates
# nothing).
POSTGRES_SERVER ?= postgresql://postgres@127.0.0.1:5432
DATABASE ?= acode
ACODE_POSTGRES_URL ?= $(POSTGRES_SERVER)/$(DATABASE)
# The server as shown on screen: host and port, no user or password.
SERVER_SHOWN = $(lastword $(subst @, ,$(subst //, ,$(POSTGRES_SERVER))))

.PHONY: run database test lint bench deb clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Create (or upgrade) the workspace database of $(WORKSPACE), show it, then run the daemon
# in the foreground on that workspace (no config file: it syncs the current directory's
# workspace). Ctrl-C stops it after in-flight batches commit.
# (Exported rather than written into the command line, which make prints.)
run: export ACODE_POSTGRES_URL := $(ACODE_POSTGRES_URL)
run: $(BIN)/.installed database
	$(BIN)/acode db migrate --workspace $(WORKSPACE)
	$(BIN)/acode db status --workspace $(WORKSPACE)
	cd $(WORKSPACE) && $(abspath $(BIN))/acode-syncd run

# Create the database $(DATABASE) on $(POSTGRES_SERVER) if it is missing (psql and createdb
# come with PostgreSQL's client package; the psql variable :'db' quotes the name). A server
# that is down stops nothing: the daemon keeps the records until it can ship them.
PSQL = psql -X -q -t -A -d '$(POSTGRES_SERVER)/postgres'
database:
ifeq ($(origin ACODE_POSTGRES_URL),file)
	@if ! command -v psql >/dev/null || ! command -v createdb >/dev/null; then \
		echo "make run: no psql or createdb (PostgreSQL's client package): create the database $(DATABASE) yourself, or set ACODE_POSTGRES_URL"; \
	elif ! $(PSQL) -c 'SELECT 1' >/dev/null 2>&1; then \
		echo "make run: no PostgreSQL at $(SERVER_SHOWN) yet; records wait in the outbox until one is up with a database $(DATABASE)"; \
	elif echo "SELECT 1 FROM pg_database WHERE datname = :'db'" | $(PSQL) -v db='$(DATABASE)' | grep -qx 1; then \
		echo "make run: ships into the PostgreSQL database $(DATABASE) at $(SERVER_SHOWN) (it exists)"; \
	else \
		createdb --maintenance-db='$(POSTGRES_SERVER)/postgres' '$(DATABASE)' && \
		echo "make run: created the PostgreSQL database $(DATABASE) at $(SERVER_SHOWN); ships into it"; \
	fi
else
	@echo "make run: ships into ACODE_POSTGRES_URL (creates no database)"
endif

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
