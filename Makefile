# memberhub — the two quick-start commands are `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# Test processes (pytest-xdist); each has its own database.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test lint typecheck pytest schemathesis bench docker-check clean

# --no-compile: modules are compiled when first imported (and their bytecode cached then),
# not every file of every installed package up front, which took most of the install.
$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e .
	@touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev]'
	@touch $@ $(STAMP)

## Install, migrate the embedded SQLite database in ./data, make sure an admin key exists
## (printed the first time), and serve on http://$(HOST):$(PORT).
run: $(STAMP)
	$(BIN)/memberhub db upgrade
	$(BIN)/memberhub apikey ensure-admin
	@echo "Console: http://$(HOST):$(PORT)/console (create the first account with:"
	@echo "  $(BIN)/memberhub staff create --email you@example.org --role admin)"
	$(BIN)/memberhub serve --host $(HOST) --port $(PORT)

## Install the dev tools; run ruff, mypy and the whole suite (SQLite, then PostgreSQL when
## MEMBERHUB_TEST_DATABASE_URL is set). mypy runs beside the suite, in the time the suite's
## processes spend waiting (its report follows the suite's); either failing fails the target.
test: $(DEV_STAMP) lint
	@report=$$(mktemp); \
	$(MAKE) --no-print-directory typecheck > $$report 2>&1 & typing=$$!; \
	$(MAKE) --no-print-directory pytest; tested=$$?; \
	wait $$typing; typed=$$?; \
	cat $$report; rm -f $$report; \
	test $$tested -eq 0 -a $$typed -eq 0

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

# The PostgreSQL pass runs again only the tests that reach the database (marked `database`
# at collection); the others would repeat the SQLite pass exactly.
# Bytecode caches are written even where PYTHONDONTWRITEBYTECODE is set: otherwise every
# process the suite starts (test processes, serve, worker, each CLI command) compiles the
# package again, and each test process rewrites and compiles every test module again.
pytest: export PYTHONDONTWRITEBYTECODE =
pytest: $(DEV_STAMP)
	env -u MEMBERHUB_TEST_DATABASE_URL $(BIN)/pytest -n $(TEST_WORKERS)
	@if [ -n "$$MEMBERHUB_TEST_DATABASE_URL" ]; then \
		echo "== again on PostgreSQL, the tests that reach the database"; \
		$(BIN)/pytest -n $(TEST_WORKERS) -m database; \
	fi

## A full schemathesis run against the app's own OpenAPI schema (the suite runs a short one),
## on PostgreSQL when MEMBERHUB_TEST_DATABASE_URL is set, on SQLite otherwise.
schemathesis: $(DEV_STAMP)
	MEMBERHUB_SCHEMATHESIS_EXAMPLES=200 $(BIN)/pytest tests/test_schemathesis.py -q

## Benchmarks: ratios against a raw baseline measured in the same run.
bench: $(DEV_STAMP)
	$(BIN)/python -m bench.write_path
	$(BIN)/python -m bench.ledger
	$(BIN)/python -m bench.webhooks
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.crm_sync
	$(BIN)/python -m bench.activities
	$(BIN)/python -m bench.exports

## Validate compose.yaml and build the image, where Compose (`docker compose`, or the older
## `docker-compose`) and a Docker daemon exist.
docker-check:
	@if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; \
	elif docker-compose version >/dev/null 2>&1; then COMPOSE="docker-compose"; fi; \
	if [ -n "$$COMPOSE" ]; then \
		POSTGRES_PASSWORD=check MEMBERHUB_SECRET_KEY=check $$COMPOSE config --quiet \
			&& echo "docker-check: compose.yaml is valid ($$COMPOSE)"; \
	else echo "docker-check: skipped compose.yaml validation (no docker compose here)"; fi
	@if docker info >/dev/null 2>&1; then \
		docker build --quiet --tag memberhub:check . && echo "docker-check: image built"; \
	else echo "docker-check: skipped the image build (no Docker daemon here)"; fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
