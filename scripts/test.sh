#!/usr/bin/env bash
# Set up (scripts/setup.sh), start a throw-away PostgreSQL on loopback, run lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-postgres
# shellcheck source=scripts/pg.sh
source scripts/pg.sh start
trap 'bash scripts/pg.sh stop' EXIT
.venv/bin/ruff check .
.venv/bin/mypy
bash scripts/lint-imports.sh
.venv/bin/python -m pytest -q "$@"
