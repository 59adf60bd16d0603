# `make run` serves the embedded default; `make test` runs the suite that needs no service.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8008

.PHONY: run test services-test lint check clean soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .[postgres]
	touch $@

$(VENV)/.dev-installed: pyproject.toml requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput -v 0
	PORT=$(PORT) $(BIN)/gunicorn -c mediarepo/gunicorn.conf.py mediarepo.asgi

test: $(VENV)/.dev-installed
	$(BIN)/pytest -m "not services"

services-test: $(VENV)/.dev-installed
	$(BIN)/pytest -m services

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Ten minutes of mixed load on the whole stack while services fail (bench/soak.py); not CI.
soak: $(VENV)/.dev-installed
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

check: $(VENV)/.run-installed
	$(BIN)/python manage.py check --deploy --fail-level ERROR

clean:
	rm -rf $(VENV) var .pytest_cache
