"""``fs verify``: check every registered shard (and index, artifact, model file) against the catalog."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from featurestore.cli import common

if TYPE_CHECKING:
    from featurestore.pipelines.verify import VerifyReport
    from featurestore.store import Store


def verify(
    feature_set: str | None = typer.Argument(None, help="Feature set to check (default: all)."),
    repair: bool = typer.Option(False, "--repair", help="Unregister the damaged shards and indexes (one "
                                "transaction, under the write lock) so that `fs extract` recomputes just their "
                                "images and `fs index build` makes a new index."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
) -> None:
    """Check every file the catalog lists: present, a regular file, its sha256 and rows as recorded.

    Each shard is read in full (its sha256 recorded at registration and the Fletcher-32
    checksum of every chunk); index files, run artifacts and model checkpoints are
    hashed. Damaged files (missing, corrupt or replaced, not matching the catalog) are
    listed with the next step; the exit code is 1 if any is found (0 after --repair
    removed them all: shards and indexes are unregistered). Shards written before
    checksums existed are counted as unchecked.

    Example: fs verify efficientnet-lite0 --repair
    """
    from featurestore.cli.hints import extract_command
    from featurestore.pipelines.verify import verify as run_verify

    store = common.open_store()
    try:
        with common.progress("verify") as tick:
            report = run_verify(store, feature_set, progress=tick)
        _print(report, fmt)
        if report.ok:
            return
        hints = {name: extract_command(store.feature_set(name)) for name in sorted({p.feature_set for p in
                                                                                report.problems})}
        if not repair:
            _advise(report, hints)
            raise typer.Exit(1)
        _repair(store, report, hints)
    finally:
        store.close()


def _print(report: VerifyReport, fmt: common.Format) -> None:
    rows = [{"feature_set": p.feature_set, "shard": p.path, "rows": p.rows, "problem": p.problem,
             "detail": p.detail, "kind": "shard"} for p in report.problems]
    rows += [{"feature_set": p.owner, "shard": p.path, "rows": None, "problem": p.problem, "detail": p.detail,
              "kind": p.kind} for p in report.file_problems]
    if rows or fmt != common.Format.table:
        common.emit(rows, fmt, ["feature_set", "shard", "rows", "problem", "detail", "kind"])
    common.err(f"verified {report.shards} shard(s), {report.rows} vectors, of {report.feature_sets} feature "
               f"set(s): {len(report.problems)} damaged, {len(report.unchecked)} without checksums; "
               f"{report.files} other file(s): {len(report.file_problems)} damaged")
    if report.unchecked:
        common.err("  shards without checksums were written by an older featurestore; recompute their set "
                   "with `fs extract ... --replace` to protect them")
    if report.undigested:
        common.err(f"  {len(report.undigested)} shard(s) were registered before sha256s were recorded; "
                   "recompute their set with `fs extract ... --replace` to bind them to it")


def _unrepairable(report: VerifyReport) -> str | None:
    others = [p for p in report.file_problems if p.kind != "index"]
    if not others:
        return None
    return (f"{len(others)} damaged run artifact or model file(s) ({', '.join(sorted({p.owner for p in others}))}) "
            "cannot be repaired here: restore them from a backup, retrain the run or run "
            "`fs models add NAME ... --replace`")


def _advise(report: VerifyReport, hints: dict[str, str]) -> None:
    if report.problems or any(p.kind == "index" for p in report.file_problems):
        common.err("next: `fs verify --repair` unregisters the damaged shards and indexes"
                   + (", then " + "; ".join(f"`{h}`" for h in hints.values()) + " recomputes their images"
                      if hints else ""))
    if why := _unrepairable(report):
        common.err(why)


def _repair(store: Store, report: VerifyReport, hints: dict[str, str]) -> None:
    from featurestore.pipelines.verify import drop_damaged_indexes, unregister

    with store.writing():
        # the writer's sweep has already unregistered shards whose path is no longer a regular file
        gone = {p.shard_id for p in report.problems} - set(store.catalog.shard_refs())
        removed, dropped = unregister(store, [p for p in report.problems if p.shard_id not in gone])
        for p in report.problems:
            if p.shard_id in gone:
                dropped[p.feature_set] = dropped.get(p.feature_set, 0) + p.rows
        removed += len(gone)
        indexes = drop_damaged_indexes(store, report.file_problems)
    for name, n in dropped.items():
        common.err(f"{name}: unregistered {n} vector(s) of damaged shards; run `{hints[name]}` to recompute them")
    for name in indexes:
        common.err(f"{name}: dropped its damaged index; run `fs index build --features {name}` to make a new one")
    if removed < len(report.problems):
        common.err("some damaged shards changed meanwhile (another writer); run `fs verify` again")
        raise typer.Exit(1)
    if why := _unrepairable(report):
        common.err(why)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
