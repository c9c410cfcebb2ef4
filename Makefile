# binance-collector: one command to run it, one command to test it.
#
#   make run      record live Binance data (starts a local Redis + PostgreSQL in var/ when
#                 REDIS_URL / DATABASE_URL are not set in the environment or .env)
#   make test     the whole test suite against throwaway local servers
#   make demo     the same stack against the built-in fake exchange, printing rows as they arrive
#   make stop     stop a running `make run` / `make demo` and the local servers
#
# `make run` and `make demo` show every process's output and also keep it in var/log/<process>.log
# (make demo: var/log/demo/<process>.log), one file per process, rotated (scripts/run_procfile.py).
#
# Everything runs from the virtual environment .venv (made by `make install`).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Reinstall only when one of these changes: their checksum is kept in the stamp file.
INSTALL_INPUTS := requirements.txt requirements-dev.txt pyproject.toml
STAMP := $(VENV)/.install-stamp

export VENV

.PHONY: help install run demo stop services-up services-down services-env test lint format bench bench-pipeline \
	ensure-servers compose-tool docker-config clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

install: ## create .venv (Python 3.11+) and install the project and its dev tools (quick when done)
	@set -euo pipefail; \
	want="$$(cat $(INSTALL_INPUTS) | sha256sum | cut -d' ' -f1)"; \
	if [[ -x "$(BIN)/python" && -f "$(STAMP)" && "$$(cat $(STAMP))" == "$$want" ]]; then exit 0; fi; \
	if ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		echo "make install: $(PYTHON) is missing or older than 3.11; install Python 3.11 or run make PYTHON=python3.11" >&2; \
		exit 1; \
	fi; \
	if [[ ! -x "$(BIN)/python" ]]; then \
		$(PYTHON) -m venv "$(VENV)" || { echo "make install: '$(PYTHON) -m venv' failed (Debian: apt-get install -y python3-venv)" >&2; exit 1; }; \
	fi; \
	"$(BIN)/python" -m pip install --quiet --upgrade pip; \
	"$(BIN)/python" -m pip install --quiet -r requirements-dev.txt; \
	"$(BIN)/python" -m pip install --quiet -e .; \
	echo "$$want" > "$(STAMP)"; \
	echo "make install: $(VENV) is ready"

# A stack ended by `make stop` (SIGTERM, 143) or Ctrl-C (130) ended as asked: not an error for make.
STACK_EXIT := code=$$?; if [ $$code -eq 143 ] || [ $$code -eq 130 ]; then exit 0; fi; exit $$code

run: install ## record live Binance data: local services if needed, init-db, then everything under honcho
	@scripts/stack.sh run; $(STACK_EXIT)

demo: install ## the same stack against the fake exchange, with short intervals and low alert thresholds
	@scripts/stack.sh demo; $(STACK_EXIT)

stop: ## stop a running `make run` / `make demo`, then the local Redis and PostgreSQL
	@scripts/stack.sh stop

services-up: install ## start the local Redis and PostgreSQL in var/ and print their URLs
	@$(BIN)/collector services up --dir var

services-down: install ## stop the local Redis and PostgreSQL in var/ (data stays in var/)
	@$(BIN)/collector services down --dir var

services-env: install ## print REDIS_URL / DATABASE_URL of the running local services
	@$(BIN)/collector services env --dir var

ensure-servers: ## make sure redis-server and the PostgreSQL server binaries exist (installs them as root)
	@scripts/ensure-servers.sh

test: install ensure-servers compose-tool ## run the test suite (it starts its own throwaway Redis and PostgreSQL)
	$(BIN)/pytest -q

lint: install ## ruff (rules and formatting) and mypy (strict, with the pydantic plugin); CI runs it first
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy collector celeryconfig.py

format: install ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install ensure-servers ## throughput benchmarks (see bench/)
	$(BIN)/python bench/stream_throughput.py
	$(BIN)/python bench/drain_throughput.py
	$(BIN)/python bench/export_throughput.py
	$(BIN)/python bench/streams_many.py
	$(BIN)/python bench/pipeline.py

bench-pipeline: install ensure-servers ## the whole pipeline at 10k/20k/50k msg/s and the highest sustained (bench/pipeline.py; ~10 min)
	$(BIN)/python bench/pipeline.py $(ARGS)

compose-tool: install ## best effort: a Docker Compose v2 client in .venv/bin for the offline config check
	@scripts/compose-tool.sh

docker-config: compose-tool ## check the compose files with your .env offline: names each secret still unset
	@if docker compose version >/dev/null 2>&1; then docker compose config --quiet; \
	else $(BIN)/docker-compose config --quiet; fi && echo "the compose files and .env are valid"

clean: ## remove caches (keeps .venv and the data in var/)
	rm -rf .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
