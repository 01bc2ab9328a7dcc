#!/usr/bin/env bash
# Check the import-linter contracts (pyproject.toml [tool.importlinter]) on the package as a wheel installs it:
# cli/ and migrations/ are mapped into featurestore.cli / featurestore.migrations by package-dir, which only
# an installed copy shows to import-linter (the source tree keeps them at the top, the layout asked for).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$repo/.venv/bin/pip" install -q --no-deps --no-build-isolation --target "$tmp/site" "$repo" >"$tmp/pip.log" 2>&1 \
  || { cat "$tmp/pip.log" >&2; exit 1; }
cd "$tmp" && PYTHONPATH="$tmp/site" "$repo/.venv/bin/lint-imports" "$repo/pyproject.toml" --no-cache
