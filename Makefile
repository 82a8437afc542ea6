# The usual targets; `make dev` and `make test` are the README's two commands.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: help dev test lint fmt typecheck unit integration reliability cluster bench settings-table clean

help:
	@echo "make dev           RabbitMQ + example workers + producers (docker compose, else local)"
	@echo "make test          install test dependencies, ruff, mypy, the whole pytest suite"
	@echo "make lint | fmt | typecheck | unit | integration | reliability | cluster | bench | settings-table"

dev:
	scripts/dev.sh

test:
	scripts/test.sh

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck:
	$(BIN)/mypy workerkit workers scripts/settings_table.py

unit:
	$(BIN)/python -m pytest tests/unit

integration:
	$(BIN)/python -m pytest tests/integration

reliability:
	$(BIN)/python -m pytest tests/reliability

cluster:
	$(BIN)/python -m pytest -m cluster tests/cluster

bench:
	$(BIN)/python -m benchmarks.run

settings-table:
	$(BIN)/python scripts/settings_table.py --write
	$(BIN)/python scripts/settings_table.py --env > config/.env.example

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
