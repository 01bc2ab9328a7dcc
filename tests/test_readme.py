"""The README's Python-API snippet runs exactly as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from featurestore.cli.main import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no ```python block"
    return match.group(1)


def test_python_api_snippet_runs_as_written(image_tree: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for args in (["ingest", str(image_tree)], ["extract", "--rp", "128"]):
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
    snippet = _python_api_snippet()
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "rp128 128 (12, 128)"
    hits = [line.split() for line in lines[1:4]]
    assert [h[0] for h in hits] == ["1", "2", "3"] and all(h[2] == "sneaker" for h in hits)
    assert all(abs(float(h[3]) - (1 - float(h[4]))) < 2e-3 for h in hits)
    assert lines[4].startswith("(12, 128) {'rp128': (0, 128)}") and "'sandal', 'shirt', 'sneaker'" in lines[4]
