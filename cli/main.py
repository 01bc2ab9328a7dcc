"""The ``fs`` command: small Typer apps per noun, joined here."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from featurestore import __version__
from featurestore.cli import (
    common,
    datasets,
    db,
    export,
    extract,
    index,
    ingest,
    models,
    report,
    search,
    serve,
    status,
    train,
    verify,
)
from featurestore.errors import FeatureStoreError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up runs (locks released, queries cancelled)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


class _Group(TyperGroup):
    """Turns FeatureStoreError into ``Error: ...`` on stderr and exit 1 (``--debug`` re-raises)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except FeatureStoreError as exc:
            if common.STATE.debug:
                raise
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # a path the user gave that cannot be created, read or written
            if common.STATE.debug:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"Error: {where}{exc.strerror or exc}; check the path and its permissions (or free disk space)",
                       err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            if isinstance(exc, Terminated):
                typer.echo("Terminated (SIGTERM); everything written so far is kept.", err=True)
                raise typer.Exit(143) from None
            typer.echo("Interrupted; everything written so far is kept.", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    name="fs",
    help="featurestore: catalog product photos, extract features, train and compare Two-Flow classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"featurestore {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    store: Path | None = common.STORE_OPTION,
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """featurestore: a feature store and embedding database for image classification.

    Example: fs ingest ./shoes && fs extract --rp 128 --model efficientnet-lite0
    && fs train --features rp128,efficientnet-lite0
    """
    common.STATE.store = store
    common.STATE.debug = debug


def _register() -> None:
    for module in (datasets, db, export):
        app.add_typer(module.app, name=module.__name__.rsplit(".", 1)[-1])
    for module in (ingest, status, extract, models, train, search, index, serve, report, verify):
        module.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _on_sigterm)  # `kill PID`: a message and exit 143, like Ctrl-C's 130
    app()


if __name__ == "__main__":
    main()
