# smsgate. `make run` starts everything; `make test` checks everything.  Only python3 (>= 3.11) and make needed:
# the virtualenv is created and filled on first use, and again only when the dependencies change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SOURCES := api common dispatcher tests bench chaos

.DEFAULT_GOAL := help
.PHONY: help install run api dispatcher migrate db-stop test unit lint typecheck docstrings deploy-check deploy-smoke \
	bench chaos chaos-smoke fmt clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e '.[dev,embedded]'
	touch $@

install: $(STAMP)  ## create .venv and install (done by every other target when needed)

run: $(STAMP)  ## PostgreSQL (embedded unless DATABASE_URL), schema, the API and one dispatcher, until Ctrl-C
	$(BIN)/python -m common run

api: $(STAMP)  ## the API alone
	$(BIN)/python -m api

dispatcher: $(STAMP)  ## one dispatcher alone (start as many as you like)
	$(BIN)/python -m dispatcher

migrate: $(STAMP)  ## apply schema.sql (idempotent)
	$(BIN)/python -m common migrate

db-stop:  ## stop the embedded PostgreSQL (it keeps running between runs for a quick start)
	test ! -x $(BIN)/python || $(BIN)/python -m common stop-db

test: lint unit chaos-smoke  ## linters, type checks, docstrings, the whole suite with coverage, a chaos smoke run

unit: $(STAMP)  ## the test suite with coverage, no linters
	$(BIN)/python -m pytest

lint: $(STAMP) typecheck docstrings deploy-check  ## flake8, pylint, mypy --strict, interrogate, deploy files
	$(BIN)/flake8 $(SOURCES)
	$(BIN)/pylint --rcfile=setup.cfg $(SOURCES)

typecheck: $(STAMP)
	$(BIN)/mypy

docstrings: $(STAMP)
	$(BIN)/interrogate -c setup.cfg $(SOURCES)

bench: $(STAMP)  ## benchmarks side by side with bare baselines (~6 min): docs/benchmarks.md and .json
	$(BIN)/python -m bench

chaos: $(STAMP)  ## kill -9, SIGSTOP, PostgreSQL outage, time zones (~1.5 min): docs/chaos.md; fails on a broken invariant
	$(BIN)/python -m chaos

chaos-smoke: $(STAMP)  ## the kill -9 invariants on 200 messages (~10 s), part of make test
	$(BIN)/python -m chaos --smoke

deploy-check: $(STAMP)  ## docker/, docker-compose.yml and the CI pipelines against their schemas (no Docker needed)
	VENV=$(VENV) bash docker/validate.sh

deploy-smoke: $(STAMP)  ## deploy-check, plus the image's file layout run outside Docker against PostgreSQL
	VENV=$(VENV) bash docker/validate.sh --smoke

fmt: $(STAMP)  ## sort imports
	$(BIN)/isort $(SOURCES)

clean: db-stop  ## stop the embedded PostgreSQL, then remove it, the virtualenv and caches
	rm -rf $(VENV) .data .mypy_cache .pytest_cache .hypothesis .schemathesis .coverage .coverage.* htmlcov \
		*.egg-info
