"""The ``fs`` command: small Typer apps per noun, joined here."""

from __future__ import annotations

import gc
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from featurestore import __version__, plugins
from featurestore.cli import (
    audit,
    common,
    datasets,
    db,
    export,
    extract,
    hints,
    index,
    ingest,
    labels,
    models,
    report,
    runs,
    search,
    serve,
    status,
    train,
    verify,
    versions,
)
from featurestore.cli import plugins as cli_plugins
from featurestore.errors import FeatureStoreError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up runs (locks released, queries cancelled)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    common.STATE.terminated = True  # a Ctrl-C raised by clean-up after it still reports SIGTERM
    raise Terminated()


class _Group(TyperGroup):
    """The one top-level handler: every error becomes ``Error: ...`` on stderr and exit 1 (``--debug``
    re-raises for the traceback); Ctrl-C exits 130 and SIGTERM 143 with one line."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors exit 2 as before
            raise
        except KeyboardInterrupt as exc:
            if isinstance(exc, Terminated) or common.STATE.terminated:
                typer.echo("Terminated (SIGTERM); everything written so far is kept.", err=True)
                raise typer.Exit(143) from None
            typer.echo("Interrupted; everything written so far is kept.", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the one handler: never a traceback without --debug
            if common.STATE.debug:
                raise
            typer.echo(f"Error: {_message(exc)}", err=True)
            raise typer.Exit(1) from None


def _message(exc: Exception) -> str:
    if isinstance(exc, FeatureStoreError):
        return hints.message(exc)
    if isinstance(exc, OSError):  # a path the user gave that cannot be created, read or written
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}; check the path and its permissions (or free disk space)"
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to process; write it more plainly"
    return _describe(exc)


def _describe(exc: BaseException) -> str:
    """One line for an error no handler expected: its type and first line, and how to see more."""
    orig = getattr(exc, "orig", None)  # a SQLAlchemy error: the driver's message, without the SQL
    lines = str(orig if orig is not None else exc).strip().splitlines()
    what = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if type(exc).__module__.startswith(("sqlalchemy", "psycopg2", "sqlite3")):
        return f"the catalog database failed ({what}); check FS_DATABASE_URL / --store (--debug shows the details)"
    return f"unexpected {what} (run `fs --debug ...` for the traceback and report it)"


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
    common.STATE.terminated = False


def _register() -> None:
    for module in (datasets, db, audit, labels, runs, export):
        app.add_typer(module.app, name=module.__name__.rsplit(".", 1)[-1])
    for module in (ingest, status, extract, models, train, search, index, serve, report, verify, versions):
        module.register(app)
    # Commands from plugins (hook register_commands), `fs plugins` among them; a plugin that cannot be
    # imported is reported once here and listed by `fs plugins`, and the other commands still run.
    plugin_manager = plugins.plugin_manager()
    plugin_manager.register(cli_plugins, name="featurestore.cli.plugins")
    plugin_manager.hook.register_commands(cli=app)
    for bad in plugins.failed():
        typer.echo(f"warning: plugin {bad.name} ({bad.distribution}) is not loaded: {bad.error}", err=True)


_register()


def main() -> None:
    """Console-script entry point (``featurestore.cli:main`` imports this module first, catching Ctrl-C)."""
    signal.signal(signal.SIGTERM, _on_sigterm)  # `kill PID`: a message and exit 143, like Ctrl-C's 130
    try:
        app()
    except KeyboardInterrupt:  # before or after a command runs (while parsing arguments, at exit)
        sys.stderr.write("Interrupted.\n")
        sys.exit(130)
    finally:
        # The process is ending: spare the interpreter's shutdown a garbage collection over every object
        # SQLAlchemy, pydantic and typer built (0.15 s CPU of `fs status`); atexit handlers and explicit
        # closes still run, and the memory goes back to the system with the process.
        gc.freeze()


if __name__ == "__main__":
    main()
