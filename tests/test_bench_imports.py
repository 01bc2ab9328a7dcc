"""Every name the benchmark scripts import from featurestore exists (they are not run by the suite).

The scripts import some modules inside functions (workers, optional parts), so
importing the files is not enough: each ``from featurestore... import name``
anywhere in ``bench/`` is resolved here. A rename in the library then fails this
test instead of a benchmark run (``bench_extract_rp`` broke that way once).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _imports() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "featurestore":
                found += [(path.name, node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(path.name, a.name, "") for a in node.names if a.name.split(".")[0] == "featurestore"]
    return found


IMPORTS = _imports()


def test_bench_scripts_import_featurestore() -> None:
    assert len({f for f, _, _ in IMPORTS}) >= 10  # the scan sees the scripts


@pytest.mark.parametrize(("script", "module", "name"), IMPORTS, ids=[f"{f}:{m}.{n}" for f, m, n in IMPORTS])
def test_bench_import_resolves(script: str, module: str, name: str) -> None:
    mod = importlib.import_module(module)
    if name:
        assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}") is not None, (
            f"bench/{script} imports {name} from {module}, which has no such name"
        )
