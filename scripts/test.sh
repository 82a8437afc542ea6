#!/usr/bin/env bash
# Install what the tests need and run them all: ruff, mypy, then pytest over tests/ (unit,
# integration against a real RabbitMQ, reliability with private nodes). Extra arguments go to
# pytest (scripts/test.sh -k publisher).
#
# The RabbitMQ version under test is WORKERKIT_TEST_BROKER (3.10, the host's, by default; 4.0
# or 4.3 from a Debian root that scripts/brokers.sh builds when missing): `make test BROKER=4.3`.
# WORKERKIT_TEST_MATRIX runs pytest once per "version=paths" entry after one ruff/mypy pass, and
# prints the time of each (.ci/run uses it):
#   WORKERKIT_TEST_MATRIX="3.10=tests 4.3=tests/integration,tests/reliability" scripts/test.sh
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

# `workerkit status` reads the management API when it answers (tests/integration/test_status.py
# covers both sources). The plugin ships with RabbitMQ; enabling it on a running node is online.
enable_management() {
    if [ -n "${WORKERKIT_TEST_URL:-}" ] || listening 127.0.0.1 15672; then
        return
    fi
    if ! command -v rabbitmq-plugins >/dev/null || ! listening 127.0.0.1 5672; then
        echo "no local rabbitmq-plugins: workerkit status is tested through its AMQP fallback only"
        return
    fi
    echo "enabling rabbitmq_management"
    rabbitmq-plugins enable rabbitmq_management >/dev/null
    local deadline=$((SECONDS + BROKER_DEADLINE))
    until listening 127.0.0.1 15672; do
        if ((SECONDS > deadline)); then
            echo "the management API did not listen on 127.0.0.1:15672 within ${BROKER_DEADLINE}s" >&2
            exit 1
        fi
        sleep 1
    done
}

step "virtualenv and dependencies"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'

VERSION=${WORKERKIT_TEST_BROKER:-3.10}
MATRIX=${WORKERKIT_TEST_MATRIX:-"$VERSION=tests"}
versions=$(for entry in $MATRIX; do echo "${entry%%=*}"; done | sort -u)

step "broker"
if [ -n "${WORKERKIT_TEST_URL:-}" ] || grep -qx 3.10 <<<"$versions"; then
    ensure_broker
fi
for version in $versions; do
    if [ "$version" != 3.10 ]; then
        # A missing root is built here (debootstrap, ~2-4 min); a failure stops the run loudly.
        echo "RabbitMQ $version root: $(bash scripts/brokers.sh path "$version")"
        bash scripts/brokers.sh build "$version"
    fi
done

enable_management

step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

step "mypy"
bash scripts/typecheck.sh

status=0
timings=()
for entry in $MATRIX; do
    version=${entry%%=*}
    IFS=, read -r -a paths <<<"${entry#*=}"
    step "pytest against RabbitMQ $version: ${paths[*]}"
    started=$SECONDS
    # `python -m pytest` puts the repository root on sys.path, so tests can import workers/.
    code=0
    WORKERKIT_TEST_BROKER=$version .venv/bin/python -m pytest "${paths[@]}" "$@" || code=$?
    if [ "$code" -eq 5 ]; then
        echo "pytest collected no tests: that is a failure, not a pass" >&2
    fi
    [ "$code" -eq 0 ] || status=$code
    timings+=("RabbitMQ $version (${paths[*]}): $((SECONDS - started)) s, exit $code")
done
# The cluster scenarios, last and only after a clean run: a private 3-node cluster of each
# version in WORKERKIT_CLUSTER_BROKERS (3.10 and 4.3 by default; about 3-12 minutes each).
if [ "$status" -eq 0 ] && [ "$#" -eq 0 ]; then
    for version in ${WORKERKIT_CLUSTER_BROKERS:-3.10 4.3}; do
        step "pytest: cluster scenarios (a private 3-node cluster of RabbitMQ $version)"
        started=$SECONDS
        code=0
        WORKERKIT_TEST_BROKER=$version .venv/bin/python -m pytest -m cluster tests/cluster || code=$?
        [ "$code" -eq 0 ] || status=$code
        timings+=("cluster of RabbitMQ $version (tests/cluster): $((SECONDS - started)) s, exit $code")
    done
fi
step "summary"
printf '%s\n' "${timings[@]}"
exit "$status"
