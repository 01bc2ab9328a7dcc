"""``fs serve``: the store as an HTTP service (FastAPI + uvicorn)."""

from __future__ import annotations

import typer

from featurestore.cli import common

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def serve(
    host: str | None = typer.Option(None, "--host", help="Address to listen on [default: FS_HOST or 127.0.0.1]. "
                                    "Anything but loopback (127.0.0.0/8, ::1, localhost) needs FS_API_TOKEN.",
                                    show_default=False),
    port: int | None = typer.Option(None, "--port", "-p", help="TCP port [default: FS_PORT or 8000].",
                                    show_default=False),
    workers: int = typer.Option(1, "--workers", "-w", help="Worker processes sharing the port (each loads its "
                                "own search indexes and models)."),
    allow_writes: bool = typer.Option(False, "--allow-writes", help="Accept requests that write to the store "
                                      "(predict with store=true). Needs FS_API_TOKEN; clients send "
                                      "`Authorization: Bearer <token>`."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: critical, error, warning, "
                                  "info (logs each request) or debug."),
    allowed_host: list[str] | None = typer.Option(None, "--allowed-host", help="Without FS_API_TOKEN only "
                                                  "requests whose Host is localhost, 127.0.0.1 or [::1] are "
                                                  "answered (400 otherwise, against DNS rebinding); add a name "
                                                  "the server is reached by. Repeatable; also FS_ALLOWED_HOSTS."),
) -> None:
    """Serve the store over HTTP: JSON under /v1, OpenAPI at /openapi.json, docs at /docs.

    Read-only unless started with --allow-writes. With FS_API_TOKEN set, every
    request except /v1/health (the docs included) needs `Authorization: Bearer $FS_API_TOKEN`.
    SIGINT or SIGTERM stops every worker gracefully.

    Example: fs serve --port 8000 & curl 'localhost:8000/v1/feature-sets/rp16/search?image_id=1&k=5'
    """
    from featurestore.http import server

    if port is not None and not 0 < port < 65536:
        raise typer.BadParameter("must be between 1 and 65535", param_hint="--port")
    if workers < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--workers")
    if log_level not in LOG_LEVELS:
        raise typer.BadParameter(f"must be one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    hosts = ",".join([h for h in (common.settings().allowed_hosts or "").split(",") if h] + list(allowed_host or []))
    settings = common.settings(host=host, port=port, allow_writes=True if allow_writes else None,
                               allowed_hosts=hosts or None)
    if settings.port == 0:
        raise typer.BadParameter("must be between 1 and 65535", param_hint="FS_PORT")
    server.prepare(settings)  # an unsafe bind or a missing store fails before listening
    how = "writes allowed" if settings.allow_writes else "read-only"
    where = settings.store_url or settings.store.resolve()
    common.err(f"serving {where} on http://{_url_host(settings.host)}:{settings.port} "
               f"({how}; {workers} worker{'s' if workers > 1 else ''}; docs at /docs)")
    server.serve(settings, workers=workers, log_level=log_level)
    if workers > 1:
        common.err("stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
