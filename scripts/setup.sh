#!/usr/bin/env bash
# Set up a fresh machine: Debian packages (Fashion-MNIST, Chromium and PostgreSQL for the tests)
# and a virtualenv at .venv with featurestore installed (non-editable) plus test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
# the web app's browser tests drive Debian's headless Chromium with Playwright (no browser download)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ "${1:-}" = "--with-postgres" ] && ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages: ${need_apt[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    # the postgresql package starts a cluster on 5432; the tests use their own
    service postgresql stop >/dev/null 2>&1 || true
  else
    echo "please install: sudo apt-get install ${need_apt[*]}" >&2
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import featurestore, mxnet, sklearn, h5py; print('featurestore', featurestore.__version__, 'mxnet', mxnet.__version__)" 2>/dev/null
