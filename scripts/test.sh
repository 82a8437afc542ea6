#!/usr/bin/env bash
# Install what the tests need and run them all: ruff, mypy, then pytest over tests/ (unit,
# integration against a real RabbitMQ, reliability with private nodes). Extra arguments go to
# pytest (scripts/test.sh -k publisher). Used as is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BROKER_DEADLINE=${BROKER_DEADLINE:-90}

step() { printf '\n==> %s\n' "$*"; }

listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

ensure_broker() {
    if [ -n "${WORKERKIT_TEST_URL:-}" ]; then
        echo "using WORKERKIT_TEST_URL"
        return
    fi
    if listening 127.0.0.1 5672; then
        echo "a broker listens on 127.0.0.1:5672"
        return
    fi
    if ! command -v rabbitmq-server >/dev/null; then
        echo "nothing listens on 127.0.0.1:5672 and rabbitmq-server is not installed;" \
            "the tests will try testcontainers (needs Docker)"
        return
    fi
    echo "starting rabbitmq-server -detached"
    rabbitmq-server -detached
    local deadline=$((SECONDS + BROKER_DEADLINE))
    until listening 127.0.0.1 5672; do
        if ((SECONDS > deadline)); then
            echo "RabbitMQ did not listen on 127.0.0.1:5672 within ${BROKER_DEADLINE}s" >&2
            exit 1
        fi
        sleep 1
    done
    # The port opens before the node is fully booted: the tests' fixture then waits for a real
    # AMQP handshake, again with a deadline.
    echo "RabbitMQ is up"
}

step "virtualenv and dependencies"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'

step "broker"
ensure_broker

step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

step "mypy"
.venv/bin/mypy workerkit workers scripts/settings_table.py

step "pytest"
# `python -m pytest` puts the repository root on sys.path, so tests can import workers/.
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure, not a pass" >&2
fi
if [ "$status" -eq 0 ] && [ "$#" -eq 0 ]; then
    step "pytest: cluster scenarios (a private 3-node cluster, about 12 minutes)"
    .venv/bin/python -m pytest -m cluster tests/cluster || status=$?
fi
exit "$status"
