#!/usr/bin/env bash
# Set up a fresh machine: Debian packages (Fashion-MNIST, Chromium and PostgreSQL for the tests) and two
# virtualenvs with featurestore installed (editable) plus test tools:
#   .venv        the default install: numpy 2, current onnx/scikit-learn, no MXNet (the whole suite runs here)
#   .venv-mxnet  the mxnet extra (MXNet 1.9.1, numpy 1.23, onnx 1.15; scripts/constraints-mxnet.txt), for the
#                parity tests against MXNet (pytest -m mxnet). MXNet 1.9.1 has wheels up to Python 3.11 only.
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

# pip -q still prints index-location and deprecation notices, and the build backend its warnings (a screen
# about editable installs of a package-dir layout); errors and the failing status go through.
pip_install() {
  local venv=$1
  shift
  PYTHONWARNINGS=ignore "$venv/bin/pip" install -q "$@" 2>&1 \
    | { grep -v -e "^WARNING: Location" -e "^DEPRECATION:" -e "^\[notice\]" || true; }
}

make_venv() {
  [ -x "$2/bin/python" ] || "$1" -m venv "$2"
  "$2/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
}

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
make_venv "$PY" .venv
pip_install .venv -e ".[test]"
# the worked plugin example (README "Writing a plugin"): its tests and tests/test_plugins.py use it installed
pip_install .venv -e examples/plugins/featurestore-colour-moments
.venv/bin/python -c "import featurestore, numpy, onnx; print('.venv: featurestore', featurestore.__version__, 'numpy',
numpy.__version__, 'onnx', onnx.__version__)"

MXPY=${MXNET_PYTHON:-python3.11}
if command -v "$MXPY" >/dev/null; then
  make_venv "$MXPY" .venv-mxnet
  pip_install .venv-mxnet -e ".[mxnet,test]" -c scripts/constraints-mxnet.txt
  .venv-mxnet/bin/python -c "import mxnet, numpy; print('.venv-mxnet: mxnet', mxnet.__version__, 'numpy',
numpy.__version__)"
else
  echo "no $MXPY: .venv-mxnet (the MXNet parity tests) not built; set MXNET_PYTHON to a Python 3.11" >&2
fi
