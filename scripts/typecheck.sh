#!/usr/bin/env bash
# mypy, strict (pyproject's [tool.mypy]), over everything: workerkit, workers,
# scripts/settings_table.py, benchmarks and tests. scripts/test.sh, `make typecheck` and the
# pre-commit hook all run this.
#
# Three runs because mypy names modules, and tests/, tests/reliability and tests/cluster each have
# a conftest.py at an import root (pytest imports the last two without a package, as `conftest`):
# the first run (pyproject's `files`) leaves those two out, the next two check one each.
set -euo pipefail
cd "$(dirname "$0")/.."

MYPY=${MYPY:-.venv/bin/mypy}
"$MYPY"
"$MYPY" tests/reliability/conftest.py
"$MYPY" tests/cluster/conftest.py
