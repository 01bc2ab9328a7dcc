"""``fs audit``: checks of the store's data (``fs audit labels``)."""

from __future__ import annotations

import json

import typer

from featurestore.cli import common

app = typer.Typer(help="Audit the store's data: label mistakes.", no_args_is_help=True)


@app.command("labels")
def labels(
    run: int = typer.Option(..., "--run", help="A run evaluated with --folds (see `fs runs`).", **common.ID_RANGE),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
    limit: int | None = typer.Option(None, "--limit", min=0, help="Rows to print, worst first (default: every "
                                     "flagged image on a table, every image in csv/json)."),
) -> None:
    """Rank the labels of a K-fold run's images by how likely they are wrong (cleanlab, confident learning).

    Reads the run's stored out-of-fold probabilities (`fs evaluate --folds K`); fits no model. One row per
    labelled image of the run, worst first: the given label, the most probable other class (suggested),
    cleanlab's label-quality score (lower is worse) and whether cleanlab flags it; plus cleanlab's estimate
    of how many labels are wrong. Fix them with `fs labels set --id N LABEL` or `fs labels import FILE.csv`.

    Example: fs evaluate --features efficientnet-lite0 --folds 5 && fs audit labels --run 1 --limit 20
    """
    from featurestore.pipelines.labels import audit_labels

    store = common.open_store()
    try:
        audit = audit_labels(store, run)
    finally:
        store.close()
    rows = audit.rows
    if limit is not None:
        rows = rows[:limit]
    elif fmt == common.Format.table:
        rows = [r for r in rows if r.flagged]
    out = [{"image_id": r.image_id, "label": r.label, "suggested": r.suggested, "quality": round(r.quality, 6),
            "flagged": r.flagged, "fold": r.fold} for r in rows]
    if fmt == common.Format.json:
        typer.echo(json.dumps({"run": audit.run_id, "images": len(audit.rows), "flagged": audit.n_flagged,
                               "estimated_issues": audit.estimated_issues, "rows": out}, indent=2))
    else:
        common.emit(out, fmt, ["image_id", "label", "suggested", "quality", "flagged", "fold"])
    common.err(f"run {audit.run_id}: {len(audit.rows)} images, {audit.n_flagged} flagged, cleanlab estimates "
               f"{audit.estimated_issues} wrong label(s); shown {len(out)}")
