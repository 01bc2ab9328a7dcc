"""Connecting to a Ray cluster and sizing the work for it (used by :mod:`featurestore.pipelines.cluster`).

Ray is an optional extra (``pip install "featurestore[ray]"``), imported inside
functions only. ``address`` is ``"local"`` (start a private cluster on this
machine: its own temp folder, no dashboard, loopback only, and a watchdog that
stops its processes if the driver dies), ``"auto"`` (join the cluster started
on this machine with ``ray start``) or the head's ``HOST:PORT``. A Ray
connection already open in this process (a notebook, the tests) is used as it is.
The checks here refuse a cluster the store cannot run on before any work starts:
a catalog the nodes cannot share, or workers that do not fit on the nodes.
"""


import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import make_url

from featurestore.config import Settings
from featurestore.errors import ClusterError


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError("{ray_address} needs Ray, which is not installed: pip install 'featurestore[ray]'",
                           params=("ray_address",)) from None
    return ray


def _local_ray_environment() -> None:
    """Settings a private loopback cluster needs before Ray is imported (Ray reads them from the environment).

    Ray otherwise advertises (and binds) the machine's network address even for
    a one-machine cluster; its processes inherit these variables. A value the
    user set wins.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # "no multi-node": use 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default for new clusters, set to silence its warning


@contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """``ray``, connected to the cluster at ``address`` for the block (disconnected after it).

    A connection already open in this process is used as it is and left open.
    """
    if "ray" not in sys.modules:
        # Ray's C++ failure handler would catch SIGTERM in the driver and abort with a stack dump (exit 134);
        # without it `kill PID` reaches fs's own handler (exit 143, everything written kept).
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        if address == "local":
            _local_ray_environment()
    _probe(address)
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"address": address, "logging_level": logging.WARNING, "log_to_driver": False}
    temp = None
    if address == "local":
        # Ray's sockets live under it and a socket path must stay under 108 bytes: not under a long TMPDIR.
        temp = tempfile.mkdtemp(prefix="fs-ray-", dir="/tmp" if os.access("/tmp", os.W_OK) else None)
        options.update(include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1")
        _watch(temp)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**options)
        if threading.current_thread() is threading.main_thread() and callable(sigterm):
            # ray.init replaces the handler; `kill PID` must still stop fs cleanly (exit 143, not a crash dump)
            signal.signal(signal.SIGTERM, sigterm)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        _stop(ray, temp)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError("cannot connect to the Ray cluster at {address!r} ({reason}); start one with `ray start "
                           "--head` (then use {ray_address} auto) or use {ray_address} local", params=("ray_address",),
                           address=address, reason=first) from None
    except BaseException as exc:  # Ctrl-C or `kill` while the cluster starts
        _stop(ray, temp)
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM and callable(sigterm) \
                and threading.current_thread() is threading.main_thread():
            # Ray's own handler (sys.exit(15), no message) had SIGTERM meanwhile: hand it to the previous one
            signal.signal(signal.SIGTERM, sigterm)
            os.kill(os.getpid(), signal.SIGTERM)
        raise
    try:
        yield ray
    finally:
        _stop(ray, temp)


PROBE_SECONDS = 5.0

# Run beside a private cluster (--ray local): once the driver is gone (kill -9 skips every clean-up) and its
# temp folder is still there, kill every process whose command line names that folder or whose environment
# carries RAY_MARKER=<folder> (Ray's agents, which outlive the driver otherwise, rename themselves
# "ray::DashboardAgent"...), then remove it. A clean stop removes the folder, which ends the watchdog.
RAY_MARKER = "FEATURESTORE_RAY_TEMP"
_WATCHDOG = """
import os, shutil, signal, sys, time
pid, temp = int(sys.argv[1]), sys.argv[2]
marker = (sys.argv[3] + "=" + temp + "\\0").encode()
def ours(d):
    for name, needle in (("cmdline", temp.encode()), ("environ", marker)):
        try:
            with open(f"/proc/{d}/{name}", "rb") as f:
                if needle in f.read() + b"\\0":
                    return True
        except OSError:
            pass
    return False
def alive(p):
    try:
        os.kill(p, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
while alive(pid) and os.path.isdir(temp):
    time.sleep(0.5)
if os.path.isdir(temp):
    time.sleep(1.0)
    for _ in range(3):
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid() and ours(d):
                try:
                    os.kill(int(d), signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.5)
    shutil.rmtree(temp, ignore_errors=True)
"""


def _watch(temp: str) -> None:
    """Start the watchdog of a private cluster's processes (see :data:`_WATCHDOG`); Linux only."""
    if not os.path.isdir("/proc"):
        return
    import subprocess

    os.environ[RAY_MARKER] = temp  # inherited by every process of the cluster (see _WATCHDOG)
    _WATCHDOGS.append(subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), temp, RAY_MARKER],
                                       start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL))


_WATCHDOGS: list[Any] = []  # kept so that Python does not warn about a child still running


def _probe(address: str) -> None:
    """Fail at once when nothing listens at a ``HOST:PORT`` address (``ray.init`` retries for minutes)."""
    if address in ("local", "auto") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError("{ray_address} {address!r} is not HOST:PORT, local or auto", params=("ray_address",),
                           address=address)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise ClusterError(
            "cannot connect to the Ray cluster at {address!r} ({reason}); start one with `ray start --head` (then "
            "use {ray_address} auto or its HOST:6379) or use {ray_address} local", params=("ray_address",),
            address=address, reason=exc.strerror or exc) from None


def _stop(ray: Any, temp: str | None) -> None:
    """Disconnect (and stop a cluster this process started); remove its temp folder."""
    ray.shutdown()
    if temp:
        shutil.rmtree(temp, ignore_errors=True)
        if os.environ.get(RAY_MARKER) == temp:
            del os.environ[RAY_MARKER]


# -- the cluster's shape ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    address: str
    cpus: int


def alive_nodes(ray: Any) -> list[Node]:
    return [Node(str(n["NodeManagerAddress"]), int(n.get("Resources", {}).get("CPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


def _is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_catalog(settings: Settings, nodes: Sequence[Node]) -> None:
    """Refuse a catalog that the nodes of this cluster cannot share safely."""
    url = make_url(settings.catalog_url)
    if len(nodes) > 1 and url.get_backend_name() == "sqlite":
        raise ClusterError(
            f"the catalog is SQLite ({url.database}) but the Ray cluster has {len(nodes)} nodes: SQLite on a "
            "network filesystem shared by several machines is unsafe (its locking does not hold there); put the "
            "catalog in PostgreSQL: set FS_DATABASE_URL=postgresql+psycopg2://USER@HOST/DB", remedy="db-upgrade-and"
        )
    remote_nodes = len(nodes) > 1 and any(not _is_loopback(n.address) for n in nodes)
    if remote_nodes and url.get_backend_name() != "sqlite" and _is_loopback(url.host):
        raise ClusterError(
            f"FS_DATABASE_URL names {url.host or 'a local socket'}, which the other nodes of the Ray cluster cannot "
            "reach; use the database server's network address"
        )


def pool_size(nodes: Sequence[Node], threads: int, workers: int | None) -> int:
    """How many actors of ``threads`` CPUs each to start: ``workers``, or as many as the nodes hold."""
    capacity = sum(n.cpus // threads for n in nodes)
    shape = ", ".join(f"{n.address}: {n.cpus} CPU" for n in nodes) or "no nodes"
    if capacity < 1:
        raise ClusterError("no node of the Ray cluster has {threads} CPU(s) for one worker ({shape}); lower "
                           "{ray_threads}", params=("ray_threads",), threads=threads, shape=shape)
    if workers is not None and workers > capacity:
        raise ClusterError("{workers} workers of {threads} thread(s) do not fit on the Ray cluster ({shape}: room "
                           "for {capacity}); lower {ray_workers} or {ray_threads}",
                           params=("ray_workers", "ray_threads"), workers=workers, threads=threads, shape=shape,
                           capacity=capacity)
    return workers or capacity
