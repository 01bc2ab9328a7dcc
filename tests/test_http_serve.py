"""Tests for `fs serve` (cli/serve.py), featurestore.http.server (workers) and the binding rules
(featurestore.http.access)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from featurestore.cli.main import app as cli_app
from featurestore.config import Settings
from featurestore.http import server
from featurestore.http.access import check_bind, is_loopback
from featurestore.store import Store

TOKEN = "s3cret-token"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """An empty store (serving needs only its catalog)."""
    path = tmp_path / "served.fs"
    Store.open(Settings(store=path), create=True).close()
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- binding ------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "loop"), [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("192.168.1.4", False),
                                            ("example.com", False), ("::", False)])
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_check_bind() -> None:
    check_bind("127.0.0.1", Settings())
    check_bind("0.0.0.0", Settings(api_token=TOKEN))
    check_bind("127.0.0.1", Settings(api_token=TOKEN, allow_writes=True))
    with pytest.raises(ValueError, match="FS_API_TOKEN"):
        check_bind("0.0.0.0", Settings())
    with pytest.raises(ValueError, match="--allow-writes needs FS_API_TOKEN"):
        check_bind("127.0.0.1", Settings(allow_writes=True))
    assert TOKEN not in repr(Settings(api_token=TOKEN))


def test_bind_port_in_use_is_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(server.FeatureStoreError, match=rf"cannot listen on 127.0.0.1:{port}: .*--port"):
            server.bind("127.0.0.1", port)


# --- the CLI ------------------------------------------------------------------------------


def test_cli_refuses_public_bind_without_token(store_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli_app, ["--store", str(store_path), "serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1, result.output
    assert "refusing to listen on 0.0.0.0 without FS_API_TOKEN" in result.output
    result = runner.invoke(cli_app, ["--store", str(store_path), "serve", "--allow-writes"])
    assert result.exit_code == 1
    assert "--allow-writes needs FS_API_TOKEN" in result.output


def test_cli_refuses_public_fs_host_without_token(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FS_HOST", "0.0.0.0")
    result = CliRunner().invoke(cli_app, ["--store", str(store_path), "serve"])
    assert result.exit_code == 1, result.output
    assert "refusing to listen on 0.0.0.0 without FS_API_TOKEN" in result.output


def test_cli_usage_errors(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    assert runner.invoke(cli_app, ["serve", "--help"]).exit_code == 0
    assert runner.invoke(cli_app, ["--store", str(store_path), "serve", "--port", "0"]).exit_code == 2
    assert runner.invoke(cli_app, ["--store", str(store_path), "serve", "--workers", "0"]).exit_code == 2
    monkeypatch.setenv("FS_PORT", "0")
    result = runner.invoke(cli_app, ["--store", str(store_path), "serve"])
    assert result.exit_code == 2 and "FS_PORT" in result.output


def test_cli_missing_store(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["--store", str(tmp_path / "none"), "serve"])
    assert result.exit_code == 1
    assert "no store at" in result.output


def test_cli_starts_uvicorn(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    result = CliRunner().invoke(cli_app, ["--store", str(store_path), "serve", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert TestClient(seen["app"]).get("/v1/health").json()["allow_writes"] is False


def test_cli_workers_get_settings_not_environment(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 8: the resolved options reach the workers as Settings; the environment is left alone."""
    seen: dict = {}
    monkeypatch.setattr(server, "run_workers", lambda settings, workers, log_level: seen.update(
        settings=settings, workers=workers, log_level=log_level))
    monkeypatch.setenv("FS_API_TOKEN", TOKEN)
    monkeypatch.setenv("FS_ALLOW_WRITES", "0")
    before = dict(os.environ)
    result = CliRunner().invoke(cli_app, ["--store", str(store_path), "serve", "--allow-writes", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert dict(os.environ) == before
    settings = seen["settings"]
    assert seen["workers"] == 2 and settings.allow_writes is True and settings.api_token == TOKEN
    assert settings.store == store_path and (settings.host, settings.port) == ("127.0.0.1", 8000)


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({}, [], ("127.0.0.1", 8000)),
    ({"FS_HOST": "127.0.0.2", "FS_PORT": "9001"}, [], ("127.0.0.2", 9001)),
    ({"FS_HOST": "127.0.0.2", "FS_PORT": "9001"}, ["--host", "127.0.0.3", "--port", "9002"], ("127.0.0.3", 9002)),
    ({"FS_PORT": "9001"}, ["-p", "9003"], ("127.0.0.1", 9003)),
])
def test_cli_host_and_port_precedence(store_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                      args: list[str], expected: tuple[str, int]) -> None:
    """option > FS_HOST / FS_PORT > default, all resolved by Settings."""
    seen: dict = {}
    monkeypatch.setattr(server, "serve", lambda settings, **kw: seen.update(settings=settings))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli_app, ["--store", str(store_path), "serve", *args])
    assert result.exit_code == 0, result.output
    assert (seen["settings"].host, seen["settings"].port) == expected
    assert f"on http://{expected[0]}:{expected[1]}" in result.output


# --- worker processes ---------------------------------------------------------------------


def _worker_pids(parent: int) -> list[int]:
    """The parent's uvicorn worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return pids


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _health(port: int) -> dict | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/v1/health")
        resp = conn.getresponse()
        body = json.loads(resp.read()) if resp.status == 200 else None
        conn.close()
        return body
    except OSError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker pids and environments from /proc")
def test_two_workers_answer_and_stop_on_sigterm(store_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FS_")}
    env["FS_PORT"] = str(port)  # the port comes from the environment, read by Settings
    cmd = [sys.executable, "-m", "featurestore.cli.main", "--store", str(store_path), "serve", "--workers", "2",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while (body := _health(port)) is None:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "fs serve --workers 2 did not answer /v1/health within 120 s"
            time.sleep(0.2)
        assert body["status"] == "ok" and body["allow_writes"] is False
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2, workers
        for pid in workers:  # nothing was exported for them: their FS_* variables are the ones we passed
            assert {k for k in _environment(pid) if k.startswith("FS_")} == {"FS_PORT"}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "stopped" in err and "Traceback" not in err
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "workers outlived the parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_worker_that_cannot_start_stops_the_service(tmp_path: Path) -> None:
    """A worker whose app cannot start (no store) exits; the parent stops the rest and says which."""
    settings = Settings(store=tmp_path / "missing", port=_free_port())
    with pytest.raises(server.WorkerExitedError, match=r"worker process \d+ exited with code 3"):
        server.run_workers(settings, 2, log_level="critical", grace=10)
