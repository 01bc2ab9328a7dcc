#!/usr/bin/env bash
# Set up (scripts/setup.sh), start a throw-away PostgreSQL and S3 server (SeaweedFS) on loopback, run lint and the test suite:
# every test on the default install (.venv: numpy 2, no MXNet; the mxnet tests skip there), then the MXNet
# parity tests (-m mxnet) in .venv-mxnet (MXNet 1.9.1, numpy 1.23).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-postgres
# shellcheck source=scripts/pg.sh
source scripts/pg.sh start
# shellcheck source=scripts/s3.sh
source scripts/s3.sh start
trap 'bash scripts/pg.sh stop; bash scripts/s3.sh stop' EXIT
if [ -z "${FS_TEST_S3_ENDPOINT:-}" ]; then
  echo "error: no S3 server (scripts/s3.sh start), so the s3 tests would not run" >&2
  exit 1
fi
.venv/bin/ruff check .
.venv/bin/mypy
bash scripts/lint-imports.sh
.venv/bin/python -m pytest -q "$@"
.venv/bin/python -m pytest -q examples/plugins/featurestore-colour-moments/tests
if [ -x .venv-mxnet/bin/python ]; then
  .venv-mxnet/bin/python -m pytest -q -m mxnet "$@"
else
  echo "error: .venv-mxnet is missing, so the MXNet parity tests did not run (see scripts/setup.sh)" >&2
  exit 1
fi
