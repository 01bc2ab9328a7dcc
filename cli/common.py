"""Shared CLI plumbing: store options, error handling, progress, output formats."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from featurestore.config import Settings
    from featurestore.store import Store

STORE_OPTION = typer.Option(
    None, "--store", envvar="FS_STORE", help="Store folder (default ./.fs).", show_default=False
)

RAY_OPTION = typer.Option(
    None, "--ray", metavar="ADDRESS", show_default=False,
    help="Run on a Ray cluster (pip install 'featurestore\\[ray]'): auto joins the cluster `ray start` runs on "
         "this machine, local starts a private one here, HOST:PORT is a cluster's head. Default FS_RAY_ADDRESS; "
         "unset runs here.",
)


# Catalog ids are positive SQL BIGINTs: a larger number is a usage error (exit 2), not a driver OverflowError.
ID_RANGE: dict[str, Any] = {"min": 1, "max": 2**63 - 1}


class State:
    """What the root callback learned from global options."""

    store: Path | None = None
    debug: bool = False
    terminated: bool = False  # SIGTERM was received


STATE = State()


def settings(**overrides: Any) -> Settings:
    from featurestore.config import Settings  # pydantic: only for commands that read settings

    return Settings.from_env(store=STATE.store, **overrides)


def open_store(create: bool = False, **overrides: Any) -> Store:
    from featurestore.store import Store  # numpy, SQLAlchemy: only for commands that open the store

    return Store.open(settings(**overrides), create=create)


def open_existing_store(**overrides: Any) -> Store | None:
    """The store if there is one (opened for reading), else None; never creates anything."""
    s = settings(**overrides)
    if not s.database_url and not (s.store / "catalog.db").is_file():
        return None
    from featurestore.store import Store

    return Store.open(s)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def error_text(exc: BaseException) -> str:
    """An error as ``fs`` words it: a library error with its hint (:mod:`featurestore.cli.hints`), else its text."""
    from featurestore.cli import hints
    from featurestore.errors import FeatureStoreError

    return hints.message(exc) if isinstance(exc, FeatureStoreError) else str(exc)


def err(msg: str) -> None:
    typer.echo(msg, err=True)


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on a TTY (stderr); when stderr is piped or a file, a plain line such as
    ``evaluate: 3/10 (30%), 95 s`` at most every :data:`PIPED_PROGRESS_S` seconds, so a long run
    logged to a file is not silent until it ends."""
    if not sys.stderr.isatty():
        yield _piped_progress(description, time.monotonic)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), transient=True, console=_stderr_console(),
    ) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, tot: int) -> None:
            bar.update(task, completed=done, total=tot)

        yield update


PIPED_PROGRESS_S = 30.0
"""Seconds between progress lines when stderr is not a terminal."""


def _piped_progress(description: str, clock: Callable[[], float]) -> Callable[[int, int], None]:
    start = clock()
    last = start

    def update(done: int, total: int) -> None:
        nonlocal last
        now = clock()
        if now - last < PIPED_PROGRESS_S:
            return
        last = now
        share = f" ({100 * done // total}%)" if total else ""
        typer.echo(f"{description}: {done}/{total or '?'}{share}, {now - start:.0f} s", err=True)

    return update


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def emit(rows: Sequence[dict[str, Any]], fmt: Format = Format.table, columns: Sequence[str] | None = None) -> None:
    """Print rows to stdout as a table, CSV or JSON."""
    cols = list(columns) if columns else (list(rows[0].keys()) if rows else [])
    if fmt == Format.json:
        typer.echo(json.dumps([{c: r.get(c) for c in cols} for r in rows], default=str, indent=2))
        return
    if fmt == Format.csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
        typer.echo(buf.getvalue(), nl=False)
        return
    typer.echo(table(rows, cols))


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        # a tiny non-zero value (a p-value) keeps its first digits instead of printing as 0.0000
        return f"{v:.3g}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    if not rows:
        lines.append("(no rows)")
    return "\n".join(lines)


def parse_size(value: str, option: str) -> tuple[int, int]:
    """``640x480`` -> (640, 480); a bad value is a usage error (exit 2)."""
    try:
        w, h = (int(v) for v in value.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 640x480", param_hint=option) from None
    return w, h
