"""Running the app: one uvicorn server in this process, or N worker processes sharing one socket.

With several workers the parent binds the socket, starts the workers itself
(``multiprocessing`` *spawn* context) and hands each the pickled
:class:`~featurestore.config.Settings` and the socket; every worker builds its
own app with :func:`~featurestore.http.app.create_app` (its own store
connection and caches) and serves the shared socket, so the kernel spreads
connections over them. Nothing is passed through the environment. The parent
waits; SIGINT or SIGTERM stops every worker gracefully (SIGKILL after
``grace`` seconds) and returns. A worker that exits on its own stops the
service with :class:`WorkerExitedError` rather than being restarted in a loop.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import NamedTuple

import uvicorn

from featurestore.config import Settings
from featurestore.errors import FeatureStoreError
from featurestore.http.access import check_bind
from featurestore.http.app import create_app
from featurestore.store import Store

log = logging.getLogger("featurestore.http")

STARTUP_FAILURE = 3  # uvicorn's exit code when the app cannot start
GRACE_SECONDS = 30.0
BACKLOG = 2048  # uvicorn's default
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class WorkerExitedError(FeatureStoreError, RuntimeError):
    """A worker process of ``fs serve --workers N`` stopped on its own."""

    def __init__(self, pid: int | None, code: int | None):
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        super().__init__(f"worker process {pid} {how}; stopped the other workers (see the log above)")


class Protocols(NamedTuple):
    """uvicorn's ``http`` (request parser) and ``loop`` (event loop) options."""

    http: str
    loop: str


def protocol_options() -> Protocols:
    """``httptools`` and ``uvloop`` when importable (dependencies of the package), else ``h11`` and ``asyncio``.

    Both are C extensions; uvloop has no Windows build, so each falls back on
    its own. With the pure-Python h11 parser and asyncio's default loop the
    HTTP layer costs a search more (issue 31, docs/RESULTS.md).
    """
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return Protocols(http, loop)


def prepare(settings: Settings) -> None:
    """Fail before listening: an unsafe bind (:func:`check_bind`) or no readable store at ``settings.store``."""
    check_bind(settings.host, settings)
    Store.open(settings).close()


def serve(settings: Settings, workers: int = 1, log_level: str = "info") -> None:
    """Serve the store on ``settings.host``:``settings.port`` until interrupted."""
    if workers > 1:
        # The FS_WORKERS thread budget (default: every core) is shared by the processes, so N
        # onnxruntime sessions do not each start one thread per core.
        settings = settings.replace(workers=max(1, settings.workers // workers))
    if workers <= 1:
        protocols = protocol_options()
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                    http=protocols.http, loop=protocols.loop)
    else:
        run_workers(settings, workers, log_level)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` that child processes can inherit."""
    bare = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bare, port))
        sock.listen(BACKLOG)  # here, so that a port in use fails now rather than in every worker
    except OSError as exc:
        sock.close()
        raise FeatureStoreError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                                "choose another --port (FS_PORT) or stop what uses it") from None
    sock.set_inheritable(True)
    return sock


def run_workers(settings: Settings, workers: int, log_level: str = "info", grace: float = GRACE_SECONDS) -> None:
    """Bind in this process, run ``workers`` worker processes on the socket, stop them on SIGINT / SIGTERM.

    Raises
    ------
    WorkerExitedError
        A worker stopped on its own (for example its app could not start).
    """
    sock = bind(settings.host, settings.port)
    stop: list[int] = []  # the signals received; a plain list: a lock taken in a signal handler could deadlock

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    procs: list[BaseProcess] = []
    try:
        log.info("listening on %s:%d with %d worker processes", settings.host, sock.getsockname()[1], workers)
        procs = _start(settings, workers, log_level, sock)
        failed = _wait(procs, stop)
    finally:
        _stop(procs, grace)
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed is not None:
        raise WorkerExitedError(failed.pid, failed.exitcode)


def _start(settings: Settings, workers: int, log_level: str, sock: socket.socket) -> list[BaseProcess]:
    """Start the workers with SIGINT ignored (a disposition they inherit), without losing one sent to us.

    A terminal's Ctrl-C reaches the whole process group; ignored, it cannot
    interrupt a worker that is still importing (no traceback per worker). Here
    SIGINT is blocked while it is ignored, so one that arrives meanwhile stays
    pending and reaches our handler once the handler and mask are restored.
    """
    ctx = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for i in range(workers):
            proc = ctx.Process(target=_worker, args=(settings, log_level, sock), name=f"fs-serve-{i + 1}")
            proc.start()
            procs.append(proc)
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return procs


def _wait(procs: list[BaseProcess], stop: list[int]) -> BaseProcess | None:
    """Until a signal arrives (None) or a worker exits on its own (that worker)."""
    while not stop:
        for proc in procs:
            if not proc.is_alive():
                return proc
        time.sleep(0.2)
    return None


def _stop(procs: list[BaseProcess], grace: float) -> None:
    """SIGTERM every live worker (uvicorn shuts down gracefully), SIGKILL those still running after ``grace``."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(grace)
        if proc.is_alive():
            log.warning("worker %s did not stop within %.0fs: killing it", proc.pid, grace)
            proc.kill()
            proc.join()


class _WorkerServer(uvicorn.Server):
    """uvicorn's server minus its own SIGINT handling: the parent decides when workers stop."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGINT:
            super().handle_exit(sig, frame)


def _worker(settings: Settings, log_level: str, sock: socket.socket) -> None:
    """One worker process: its own app and store on the inherited socket."""
    # SIGINT is ignored from the start (see _start) and by _WorkerServer: the parent turns SIGINT and
    # SIGTERM into one SIGTERM per worker (uvicorn's graceful shutdown), so it never finds a worker gone
    # before it saw the signal itself.
    protocols = protocol_options()
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                            http=protocols.http, loop=protocols.loop)
    server = _WorkerServer(config)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)
