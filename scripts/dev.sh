#!/usr/bin/env bash
# The example app running on one machine: RabbitMQ, every example worker, the web app, and a
# burst of orders and images from the producer script; then the results.
#
#   scripts/dev.sh           run until Ctrl-C (the workers drain and exit cleanly)
#   scripts/dev.sh --once    show the results, then stop (a non-interactive check)
#
# With a Docker engine this is `docker compose up --build`. Without one (set DEV_LOCAL=1 to force
# it) it uses .venv and a local RabbitMQ, starting `rabbitmq-server -detached` if nothing listens
# on 127.0.0.1:5672. State goes to $DEV_DIR (default /tmp/workerkit-dev): logs, the fake e-mail
# outbox, the audit log and the thumbnails. The DLQs of the example queues are emptied at start so
# that what it shows is this run's.
set -euo pipefail
cd "$(dirname "$0")/.."

ONCE=0
case "${1:-}" in
--once) ONCE=1 ;;
"") ;;
*)
    echo "usage: $0 [--once]" >&2
    exit 2
    ;;
esac

if [ "${DEV_LOCAL:-0}" != 1 ] && command -v docker >/dev/null 2>&1 &&
    docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    echo "Docker engine found: docker compose up --build (Ctrl-C stops the stack)"
    if [ "$ONCE" = 1 ]; then
        exec docker compose up --build --exit-code-from producer
    fi
    exec docker compose up --build
fi

PYTHON=${PYTHON:-python3}
DEV_DIR=${DEV_DIR:-/tmp/workerkit-dev}
WEBAPP_PORT=${WEBAPP_PORT:-8000}
HEALTH_BASE=${DEV_HEALTH_BASE:-18080}
ORDERS=${DEV_ORDERS:-200}
IMAGES=${DEV_IMAGES:-5}
WORKERS=(workers.receipts:SendReceipt workers.thumbnails:MakeThumbnail workers.audit:AuditLog)
QUEUES=(receipts thumbnails audit)
PIDS=()
NAMES=()

say() { printf '\n==> %s\n' "$*"; }
listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Poll a URL until it answers 200, or give up after $2 seconds naming the log to read.
wait_http() {
    local url=$1 deadline=$((SECONDS + $2)) log=$3
    until .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$url" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            echo "no answer from $url within $2s; see $log:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

stop_all() {
    trap - INT TERM EXIT
    if [ "${#PIDS[@]}" -eq 0 ]; then
        return
    fi
    say "stopping (SIGTERM: workers finish in-flight messages, then exit)"
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    local i status
    for i in "${!PIDS[@]}"; do
        status=0
        wait "${PIDS[$i]}" || status=$?
        printf '  %-36s exit %s\n' "${NAMES[$i]}" "$status"
    done
    echo "logs and results stay in $DEV_DIR; the broker keeps running (rabbitmqctl stop stops it)"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "virtualenv ($PWD/.venv)"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ ! -x .venv/bin/workerkit ] || [ pyproject.toml -nt .venv/.workerkit-dev ]; then
    echo "pip install -e . (log: .venv/pip-install.log)"
    if ! .venv/bin/python -m pip install --disable-pip-version-check -e . >.venv/pip-install.log 2>&1; then
        tail -n 30 .venv/pip-install.log >&2
        exit 1
    fi
    touch .venv/.workerkit-dev
fi
echo "workerkit $(.venv/bin/python -c 'import workerkit; print(workerkit.__version__)') installed"

say "broker"
if listening 127.0.0.1 5672; then
    echo "RabbitMQ listens on 127.0.0.1:5672"
elif command -v rabbitmq-server >/dev/null; then
    echo "starting rabbitmq-server -detached"
    rabbitmq-server -detached
    deadline=$((SECONDS + 90))
    until listening 127.0.0.1 5672; do
        if ((SECONDS > deadline)); then
            echo "RabbitMQ did not come up within 90s" >&2
            exit 1
        fi
        sleep 1
    done
else
    echo "no broker on 127.0.0.1:5672, no rabbitmq-server and no Docker engine:" \
        "install RabbitMQ or Docker" >&2
    exit 1
fi

if ! listening 127.0.0.1 15672 && command -v rabbitmq-plugins >/dev/null; then
    echo "enabling rabbitmq_management (workerkit status, http://127.0.0.1:15672)"
    rabbitmq-plugins enable rabbitmq_management >/dev/null
    deadline=$((SECONDS + 60))
    until listening 127.0.0.1 15672; do
        if ((SECONDS > deadline)); then
            echo "the management API did not come up within 60s" >&2
            exit 1
        fi
        sleep 1
    done
fi

rm -rf "$DEV_DIR"
mkdir -p "$DEV_DIR/logs"
export RECEIPTS_OUTBOX=$DEV_DIR/outbox.jsonl AUDIT_LOG=$DEV_DIR/audit.jsonl
export THUMBNAILS_DIR=$DEV_DIR/thumbnails WEBAPP_PORT

say "workers (one process each, as in production)"
for i in "${!WORKERS[@]}"; do
    target=${WORKERS[$i]}
    port=$((HEALTH_BASE + i))
    log=$DEV_DIR/logs/${QUEUES[$i]}.log
    .venv/bin/workerkit run "$target" --health-host 127.0.0.1 --health-port "$port" >"$log" 2>&1 &
    PIDS+=($!)
    NAMES+=("workerkit run $target")
done
for i in "${!WORKERS[@]}"; do
    wait_http "http://127.0.0.1:$((HEALTH_BASE + i))/health" 60 "$DEV_DIR/logs/${QUEUES[$i]}.log"
    echo "  ${WORKERS[$i]} is consuming (log: $DEV_DIR/logs/${QUEUES[$i]}.log)"
done
for queue in "${QUEUES[@]}"; do
    .venv/bin/workerkit dlq purge "$queue" --yes >/dev/null
done

say "web app on http://127.0.0.1:$WEBAPP_PORT"
if listening 127.0.0.1 "$WEBAPP_PORT"; then
    echo "port $WEBAPP_PORT is taken: set WEBAPP_PORT" >&2
    exit 1
fi
.venv/bin/python -m workers.webapp >"$DEV_DIR/logs/webapp.log" 2>&1 &
PIDS+=($!)
NAMES+=("python -m workers.webapp")
wait_http "http://127.0.0.1:$WEBAPP_PORT/health" 30 "$DEV_DIR/logs/webapp.log"

say "producer script: $ORDERS orders and $IMAGES images from 4 threads"
.venv/bin/python -m workers.produce --orders "$ORDERS" --images "$IMAGES" --threads 4

say "three orders through the web app (POST /orders)"
for body in '{"order_id": 900001, "email": "web@shop.example"}' \
    '{"order_id": 900002}' \
    '{"order_id": "not-a-number"}'; do
    printf '  %s -> ' "$body"
    .venv/bin/python - "$WEBAPP_PORT" "$body" <<'PY'
import sys, urllib.error, urllib.request
request = urllib.request.Request(
    f"http://127.0.0.1:{sys.argv[1]}/orders", data=sys.argv[2].encode(), method="POST"
)
try:
    with urllib.request.urlopen(request, timeout=15) as reply:
        print(reply.status, reply.read().decode())
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode()[:120])
PY
done

say "waiting for the workers to settle"
count() { [ -f "$1" ] && wc -l <"$1" | tr -d ' ' || echo 0; }
snapshot() { echo "$(count "$RECEIPTS_OUTBOX") $(count "$AUDIT_LOG") $(find "$THUMBNAILS_DIR" -name '*.pgm' 2>/dev/null | wc -l)"; }
last="" stable=0 deadline=$((SECONDS + 120))
while ((stable < 3)); do
    sleep 1
    now=$(snapshot)
    if [ "$now" = "$last" ]; then stable=$((stable + 1)); else stable=0; fi
    last=$now
    if ((SECONDS > deadline)); then
        echo "still changing after 120s; showing what is there" >&2
        break
    fi
done

say "results"
read -r receipts audit thumbs <<<"$(snapshot)"
retried=$(grep -c '"attempt": 2' "$RECEIPTS_OUTBOX" || true)
printf '  %-44s %s\n' "receipts sent (FAKE e-mail, outbox.jsonl)" "$receipts" \
    "  of which retried once, then sent" "$retried" \
    "audit log lines (audit.jsonl)" "$audit" \
    "thumbnails (thumbnails/*.pgm)" "$thumbs"
echo "  files in $DEV_DIR"
for queue in "${QUEUES[@]}"; do
    say "workerkit dlq list $queue"
    .venv/bin/workerkit dlq list "$queue" --limit 8
done

if [ "$ONCE" = 1 ]; then
    exit 0
fi
say "running: http://127.0.0.1:$WEBAPP_PORT  (try: curl -d '{\"order_id\": 7, \"email\": \"a@b.c\"}' http://127.0.0.1:$WEBAPP_PORT/orders)"
echo "    worker logs in $DEV_DIR/logs. Ctrl-C to stop."
wait -n "${PIDS[@]}" || true
echo "a process exited on its own; stopping the rest" >&2
exit 1
