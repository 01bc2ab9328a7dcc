"""``fs labels``: change image labels, with history (set, import, history, undo)."""

from __future__ import annotations

from pathlib import Path

import typer

from featurestore.cli import common

app = typer.Typer(help="Change image labels; every change is kept (history, undo).", no_args_is_help=True)

NEW_LABEL = typer.Option(False, "--new-label", help="Allow a label no image has yet (refused otherwise: a typo "
                         "would create a class).")


def _changed(ids: list[int], what: str) -> None:
    if ids:
        span = f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"
        common.err(f"{len(ids)} label(s) changed ({what}); change id(s) {span}; undo with `fs labels undo ID`")
    else:
        common.err(f"nothing changed ({what}): the images already had that label")


@app.command("set")
def set_(
    label: str = typer.Argument(..., help="The new label (a class name in use, or any with --new-label)."),
    ids: list[int] = typer.Option(None, "--id", help="Image id (repeat the option for several).",
                                  **common.ID_RANGE),
    where: str | None = typer.Option(None, "--where", "-w", help="SQL condition selecting images (read-only "
                                     "rules of `fs sql`), e.g. \"label = 'shirt' AND dataset = 'spring'\"."),
    superclass: str | None = typer.Option(None, "--superclass", help="Superclass to store with the label "
                                          "(default: the one the label's images have)."),
    reason: str | None = typer.Option(None, "--reason", help="Why (kept in the history)."),
    new_label: bool = NEW_LABEL,
) -> None:
    """Give images a new label; each change is a history row (who: the OS user).

    Example: fs labels set --id 12 --id 40 t-shirt --reason "short sleeves"
    """
    if bool(ids) == bool(where):
        raise typer.BadParameter("give --id N (repeatable) or --where CONDITION, not both")
    from featurestore.catalog.readonly import ReadOnlyCatalog
    from featurestore.pipelines.labels import set_labels

    store = common.open_store()
    try:
        with store.writing(sweep=False):
            chosen = list(ids) if ids else ReadOnlyCatalog.from_settings(store.settings).image_ids_where(where or "")
            if not chosen:
                raise typer.BadParameter(f"no image matches {where!r}", param_hint="--where")
            changed = set_labels(store, chosen, label, superclass, reason, new_label)
    finally:
        store.close()
    _changed(changed, f"{len(chosen)} image(s) selected")


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="CSV: image,label[,reason[,superclass]] per line; image is an id or "
                                "the path it was ingested from. A header line is allowed."),
    new_label: bool = NEW_LABEL,
) -> None:
    """Apply a CSV of label corrections: all rows or none (one transaction; a bad row names its line).

    Example: fs labels import fixes.csv
    """
    from featurestore.pipelines.labels import import_labels

    store = common.open_store()
    try:
        with store.writing(sweep=False):
            changed, unchanged = import_labels(store, path, new_label)
    finally:
        store.close()
    _changed(changed, f"{path}; {unchanged} row(s) already had their label")


@app.command("history")
def history(
    image_id: int | None = typer.Option(None, "--id", help="Only this image's changes.", **common.ID_RANGE),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Newest N changes."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
) -> None:
    """List label changes, newest first (also queryable: `fs sql "SELECT * FROM label_changes"`).

    Example: fs labels history --id 12
    """
    from featurestore.pipelines.labels import history as label_history

    store = common.open_store()
    try:
        rows = label_history(store, image_id, limit)
    finally:
        store.close()
    common.emit([{"change": r.id, "image_id": r.image_id, "old": r.old_label, "new": r.new_label,
                  "superclass": r.new_superclass, "when": r.changed_at.strftime("%Y-%m-%d %H:%M:%S"),
                  "by": r.changed_by, "source": r.source, "reason": r.reason, "undoes": r.undoes} for r in rows],
                fmt, ["change", "image_id", "old", "new", "superclass", "when", "by", "source", "reason", "undoes"])


@app.command("undo")
def undo(
    change_ids: list[int] = typer.Argument(..., help="Change id(s) from `fs labels history`.", **common.ID_RANGE),
) -> None:
    """Put back the labels that changes replaced (recorded as new changes; refused if a later change
    overwrote one, naming it).

    Example: fs labels undo 7
    """
    from featurestore.pipelines.labels import undo as undo_changes

    store = common.open_store()
    try:
        with store.writing(sweep=False):
            changed = undo_changes(store, change_ids)
    finally:
        store.close()
    _changed(changed, f"undo of {', '.join(map(str, change_ids))}")
