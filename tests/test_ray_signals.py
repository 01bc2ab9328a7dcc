"""Ray drivers stopped from outside (issue 32, item 8): `kill PID` exits 143, `kill -9` leaves no Ray processes.

These start a private cluster (`--ray local`) in a child process and stop it from outside. They live in
their own module, which pytest runs after tests/test_pipelines_cluster.py: when they ran first, the simulated
cluster started later in the same session never answered `ray.init` (cause not found yet).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from featurestore.cli.main import app
from helpers import make_image

BOUND = 120  # seconds a runaway trial may take before the test calls it a hang
# Enough images, one per batch, that the extraction still runs when the signal comes, also on a quiet machine
# (400 ran out there: 400 images in 5.9 s, done before the signal).
IMAGES = 1500
runner = CliRunner()


def fs(*args: str) -> Any:
    return runner.invoke(app, list(args))


def _ray_processes(temp_prefix: str = "/tmp/fs-ray-") -> dict[int, str]:
    """pid -> command line of the processes of private Ray clusters (`--ray local`) on this machine: those
    naming its temp folder, or carrying its marker in their environment (agents rename themselves)."""
    out = {}
    marker = b"FEATURESTORE_RAY_TEMP=" + temp_prefix.encode()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
                env = Path(f"/proc/{d}/environ").read_bytes()
            except OSError:
                continue
            text = cmd.replace(b"\0", b" ").decode(errors="replace")
            if (temp_prefix.encode() in cmd or marker in env) and text.split()[1:2] != ["-c"]:
                out[int(d)] = text
    return out


def _start_ray_extract(tmp_path: Path) -> tuple[subprocess.Popen[str], set[int]]:
    for i in range(IMAGES):
        make_image(tmp_path / "many" / "c" / f"{i}.png", size=(64, 48), seed=i)
    assert fs("ingest", str(tmp_path / "many")).exit_code == 0
    before = set(_ray_processes())
    proc = subprocess.Popen([sys.executable, "-m", "featurestore.cli.main", "extract", "--rp", "16", "--size",
                             "16x12", "--batch", "1", "--ray", "local"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(int(BOUND / 0.5)):  # until the cluster's agents run
        if any("ray::" in c for p, c in _ray_processes().items() if p not in before) or proc.poll() is not None:
            break
        threading.Event().wait(0.5)
    threading.Event().wait(3.0)
    assert proc.poll() is None, proc.communicate()
    return proc, before


def _left(before: set[int]) -> dict[int, str]:
    for _ in range(60):
        left = {p: c for p, c in _ray_processes().items() if p not in before}
        if not left:
            return {}
        threading.Event().wait(1.0)
    return left


@pytest.mark.ray
def test_kill_of_a_ray_local_extract_exits_143(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    proc, before = _start_ray_extract(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=BOUND)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "Terminated (SIGTERM); everything written so far is kept."
    assert not _left(before)


@pytest.mark.ray
def test_kill_9_of_a_ray_local_driver_leaves_no_ray_processes(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    proc, before = _start_ray_extract(tmp_path)
    proc.kill()
    proc.communicate(timeout=BOUND)
    left = _left(before)
    assert not left, left
