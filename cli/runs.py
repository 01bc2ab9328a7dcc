"""``fs runs``: list the runs (``fs runs``), name them and note things about them (``fs runs name``)."""

from __future__ import annotations

import typer

from featurestore.cli import common, train

app = typer.Typer(invoke_without_command=True)  # help: the callback's docstring


@app.callback()
def listing(ctx: typer.Context,
            fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format.")) -> None:
    """List training and evaluation runs with their scores (and their names); `fs runs name` names one.

    Example: fs runs --format csv
    """
    if ctx.invoked_subcommand is None:
        train.runs(fmt)


@app.command("name")
def name(run: int = typer.Argument(..., help="Run id (see `fs runs`)."),
         text: str = typer.Argument(..., help="The run's name; an empty string removes it."),
         notes: str | None = typer.Option(None, "--notes", help="Also set the run's notes (free text; an empty "
                                          "string removes them). Without it the notes stay as they are.")) -> None:
    """Name a run (shown by `fs runs`, the web app's run menus and pages), and optionally set its notes.

    Example: fs runs name 4 "rp128 + effnet, grid search" --notes "baseline for the spring catalogue"
    """

    with common.open_store() as store, store.writing():
        row = store.catalog.set_run_note(run, text, notes, keep_notes=notes is None)
    common.err(f"run {run}: " + (f"named {row.name!r}" if row.name else "name removed")
               + ("" if notes is None else "; notes " + ("set" if row.notes else "removed")))


@app.command("show-notes")
def show_notes(run: int = typer.Argument(..., help="Run id (see `fs runs`).")) -> None:
    """Print a run's name and notes.

    Example: fs runs show-notes 4
    """

    with common.open_store() as store:
        store.catalog.run(run)  # unknown run: the usual error
        row = store.catalog.run_note(run)
    typer.echo(f"name: {row.name or ''}\n{row.notes or ''}".rstrip())
