"""``fs report``: a run's report as one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path

import typer

from featurestore.cli import common


def report(
    run: int = typer.Argument(..., help="Run id (see `fs runs`)."),
    out: Path = typer.Option(..., "--out", "-o", help="HTML file to write (replaced atomically if it exists)."),
    held_out: bool = typer.Option(False, "--held-out", help="Confusion matrix of the images the run cannot have "
                                  "trained on only (ingested after it, or outside its dataset)."),
    mistakes: int = typer.Option(12, "--mistakes", help="Most confident mistakes shown as embedded thumbnails "
                                 "(0: none)."),
) -> None:
    """Write a run's report (settings, per-split accuracy, confusion matrix of its stored predictions,
    per-class precision / recall / F1, mistakes) as one self-contained HTML file to share.

    Charts are inline SVG and thumbnails embedded: the file makes no request and names no server path.
    The confusion matrix needs stored predictions (`fs predict --run RUN --dataset NAME`).

    Example: fs report 3 --out run3.html
    """
    from featurestore.http.report import render_report
    from featurestore.io.atomic import write_bytes_atomic

    if run < 1:
        raise typer.BadParameter("must be a run id (1 or more), see `fs runs`", param_hint="RUN")
    if not 0 <= mistakes <= 100:
        raise typer.BadParameter("must be between 0 and 100", param_hint="--mistakes")
    store = common.open_store()
    try:
        html = render_report(store, run, held_out_only=held_out, mistakes=mistakes)
    finally:
        store.close()
    data = html.encode("utf-8")
    write_bytes_atomic(out, data)
    common.err(f"wrote {out} ({len(data) / 1024:,.0f} KiB): report of run {run}; open it in any browser")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
