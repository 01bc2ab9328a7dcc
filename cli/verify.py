"""``fs verify``: check every registered shard against the catalog."""

from __future__ import annotations

import typer

from featurestore.cli import common


def verify(
    feature_set: str | None = typer.Argument(None, help="Feature set to check (default: all)."),
    repair: bool = typer.Option(False, "--repair", help="Unregister the damaged shards (one transaction, under "
                                "the write lock) so that `fs extract` recomputes just their images."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
) -> None:
    """Check every shard the catalog lists: present, readable, rows and ids as recorded, checksums intact.

    Each shard is read in full (Fletcher-32 checksum of every chunk). Damaged shards
    (missing, corrupt, not matching the catalog) are listed with the next step; the
    exit code is 1 if any is found (0 after --repair removed them all). Shards written
    before checksums existed are counted as unchecked.

    Example: fs verify efficientnet-lite0 --repair
    """
    from featurestore.features.registry import extract_hint
    from featurestore.pipelines.verify import unregister
    from featurestore.pipelines.verify import verify as run_verify

    store = common.open_store()
    try:
        with common.progress("verify") as tick:
            report = run_verify(store, feature_set, progress=tick)
        rows = [{"feature_set": p.feature_set, "shard": p.path, "rows": p.rows, "problem": p.problem,
                 "detail": p.detail} for p in report.problems]
        if rows or fmt != common.Format.table:
            common.emit(rows, fmt, ["feature_set", "shard", "rows", "problem", "detail"])
        common.err(f"verified {report.shards} shard(s), {report.rows} vectors, of {report.feature_sets} feature "
                   f"set(s): {len(report.problems)} damaged, {len(report.unchecked)} without checksums")
        if report.unchecked:
            common.err("  shards without checksums were written by an older featurestore; recompute their set "
                       "with `fs extract ... --replace` to protect them")
        if report.ok:
            return
        hints = {}
        for name in sorted({p.feature_set for p in report.problems}):
            hints[name] = extract_hint(store.feature_set(name))
        if not repair:
            common.err("next: `fs verify --repair` unregisters the damaged shards, then "
                       + "; ".join(f"`{h}`" for h in hints.values()) + " recomputes their images")
            raise typer.Exit(1)
        with store.writing():
            removed, dropped = unregister(store, report.problems)
    finally:
        store.close()
    for name, n in dropped.items():
        common.err(f"{name}: unregistered {n} vector(s) of damaged shards; run `{hints[name]}` to recompute them")
    if removed < len(report.problems):
        common.err("some damaged shards changed meanwhile (another writer); run `fs verify` again")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
