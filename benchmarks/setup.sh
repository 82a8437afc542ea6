#!/bin/sh
# What the benchmarks need beyond the Python extras: gcc and librabbitmq for the C "limit" rows,
# valgrind for benchmarks.instructions (the instruction counts of benchmarks/METRICS.md).
# Best effort: without them the benchmarks still run and the limit rows say "not available".
set -u
have_header() {
  printf '#include <amqp.h>\n' | cc -E -x c - >/dev/null 2>&1 ||
    printf '#include <rabbitmq-c/amqp.h>\n' | cc -E -x c - >/dev/null 2>&1
}
if command -v gcc >/dev/null 2>&1 && have_header && command -v valgrind >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get -o DPkg::Lock::Timeout=300 update -q &&
    apt-get -o DPkg::Lock::Timeout=300 install -y -q gcc librabbitmq-dev valgrind && exit 0
  echo "benchmarks/setup.sh: installing gcc librabbitmq-dev valgrind failed; the limit rows" \
    "will say so" >&2
else
  echo "benchmarks/setup.sh: install gcc and librabbitmq-dev (Debian/Ubuntu) or rabbitmq-c" \
    "for the C limit rows (without them those rows say 'not available'), and valgrind for" \
    "benchmarks.instructions" >&2
fi
exit 0
