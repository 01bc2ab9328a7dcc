"""``fs serve``: the store as an HTTP service (FastAPI + uvicorn)."""

from __future__ import annotations

import os

import typer

from featurestore.cli import common


def serve(
    host: str = typer.Option("127.0.0.1", "--host", envvar="FS_HOST", help="Address to listen on. Anything but "
                             "loopback (127.0.0.0/8, ::1, localhost) needs FS_API_TOKEN."),
    port: int = typer.Option(8000, "--port", "-p", envvar="FS_PORT", help="TCP port."),
    workers: int = typer.Option(1, "--workers", "-w", help="Worker processes (each loads its own search "
                                "indexes and models, and gets FS_WORKERS/N of the threads)."),
    allow_writes: bool = typer.Option(False, "--allow-writes", help="Accept requests that write to the store "
                                      "(predict with store=true). Needs FS_API_TOKEN; clients send "
                                      "`Authorization: Bearer <token>`."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical, error, warning, "
                                  "info (logs each request) or debug."),
) -> None:
    """Serve the store over HTTP: JSON under /v1, OpenAPI at /openapi.json, docs at /docs.

    Read-only unless started with --allow-writes. With FS_API_TOKEN set, every
    request except /v1/health needs `Authorization: Bearer $FS_API_TOKEN`.

    Example: fs serve --port 8000 & curl 'localhost:8000/v1/feature-sets/rp128/search?image_id=1&k=5'
    """
    import uvicorn

    from featurestore.http.app import check_bind, create_app

    if not 0 < port < 65536:
        raise typer.BadParameter("must be between 1 and 65535", param_hint="--port")
    if workers < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--workers")
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if log_level not in levels:
        raise typer.BadParameter(f"must be one of {', '.join(levels)}", param_hint="--log-level")
    settings = common.settings(allow_writes=True if allow_writes else None)
    check_bind(host, settings)
    app = create_app(settings)  # opens the store now: a missing store fails before listening
    common.err(f"serving {settings.store.resolve()} on http://{_url_host(host)}:{port} "
               f"({'writes allowed' if settings.allow_writes else 'read-only'}; docs at /docs)")
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    # Worker processes import the app factory and rebuild Settings from the environment:
    # hand them the options this process resolved.
    app.state.service.store.close()
    os.environ["FS_STORE"] = str(settings.store.resolve())
    if settings.database_url:
        os.environ["FS_DATABASE_URL"] = settings.database_url
    os.environ["FS_ALLOW_WRITES"] = "1" if settings.allow_writes else "0"
    # The FS_WORKERS thread budget (default: every core) is shared by the processes, so N
    # onnxruntime sessions do not each start one thread per core.
    os.environ["FS_WORKERS"] = str(max(1, settings.workers // workers))
    uvicorn.run("featurestore.http.app:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
