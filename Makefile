# The usual targets; `make dev` and `make test` are the README's two commands.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: help dev test brokers lint fmt typecheck unit integration reliability cluster bench settings-table clean

help:
	@echo "make dev           RabbitMQ + example workers + producers (docker compose, else local)"
	@echo "make test          install test dependencies, ruff, mypy, the whole pytest suite"
	@echo "make test BROKER=4.3   the same against RabbitMQ 4.3 (or 4.0; default 3.10)"
	@echo "make brokers       build the Debian roots of RabbitMQ 4.0 and 4.3 (cached)"
	@echo "make lint | fmt | typecheck | unit | integration | reliability | cluster | bench | settings-table"

dev:
	scripts/dev.sh

# make test BROKER=4.3 (or 4.0; 3.10, the host's, by default): the suite against that version.
BROKER ?= $(WORKERKIT_TEST_BROKER)

test:
	WORKERKIT_TEST_BROKER=$(BROKER) scripts/test.sh

brokers:
	scripts/brokers.sh build 4.0 4.3

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck:
	MYPY=$(BIN)/mypy scripts/typecheck.sh

unit:
	$(BIN)/python -m pytest tests/unit

integration:
	WORKERKIT_TEST_BROKER=$(BROKER) $(BIN)/python -m pytest tests/integration

reliability:
	WORKERKIT_TEST_BROKER=$(BROKER) $(BIN)/python -m pytest tests/reliability

cluster:
	WORKERKIT_TEST_BROKER=$(BROKER) $(BIN)/python -m pytest -m cluster tests/cluster

bench:
	sh benchmarks/setup.sh
	$(BIN)/python -m benchmarks.run

settings-table:
	$(BIN)/python scripts/settings_table.py --write
	$(BIN)/python scripts/settings_table.py --env > config/.env.example

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
