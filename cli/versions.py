"""``fs versions`` and ``fs gc``: the versions ``fs extract --replace`` keeps, and deleting old ones."""

from __future__ import annotations

import json
import re
from typing import Any

import typer

from featurestore.cli import common

VERSION_HELP = ("Read an older version of the feature sets (see `fs versions SET`): N for every set, or "
                "SET=N[,SET=N...] per set. Default: the newest.")
_PER_SET = re.compile(r"^\s*([^=,\s]+)\s*=\s*(\d+)\s*$")


def parse_version(value: str | None, option: str = "--version") -> int | dict[str, int] | None:
    """``3`` -> 3; ``rp128=1,efficientnet-lite0=2`` -> a dict; anything else is a usage error (exit 2)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    out: dict[str, int] = {}
    for part in text.split(","):
        m = _PER_SET.match(part)
        if m is None or int(m.group(2)) < 1:
            raise typer.BadParameter(f"{value!r} is not a version: give N (e.g. 2) or SET=N[,SET=N...] "
                                     "(e.g. rp128=1)", param_hint=option)
        out[m.group(1)] = int(m.group(2))
    return out


def versions(
    feature_set: str = typer.Argument(..., metavar="SET", help="Feature set (see `fs status`)."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
) -> None:
    """List the versions of a feature set: number, created, params, rows, runtime and the runs that read it.

    `fs extract --replace` makes a new version and keeps the old one; everything reads the newest
    unless given --version N (fs search, train, evaluate, export features). `fs gc` deletes old versions
    no run read.

    Example: fs versions rp128 --format json
    """
    from featurestore.pipelines.versions import list_versions

    with common.open_store() as store:
        found = list_versions(store, feature_set)
    if fmt == common.Format.json:
        typer.echo(json.dumps([v.as_dict() for v in found], indent=2))
        return
    rows: list[dict[str, Any]] = [
        {"version": v.version, "latest": "yes" if v.latest else "", "created":
         v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "", "kind": v.kind, "dim": v.dim,
         "rows": v.rows, "runtime": v.runtime or "", "runs": ",".join(str(r) for r in v.runs),
         "params": json.dumps(v.params, sort_keys=True)}
        for v in found]
    common.emit(rows, fmt, ["version", "latest", "created", "kind", "dim", "rows", "runtime", "runs", "params"])


def gc(
    feature_sets: list[str] | None = typer.Argument(None, metavar="[SET...]", help="Only these feature sets "
                                                    "(default: all)."),
    keep: int = typer.Option(1, "--keep", min=1, help="Newest versions of each set always kept (the newest "
                             "one always is)."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only say what would be deleted."),
    force: bool = typer.Option(False, "--force", help="Also delete old versions that runs read; those runs can "
                               "then no longer be reproduced or predict (they are named)."),
) -> None:
    """Delete old feature-set versions that no run read, keeping the newest --keep of each set.

    Old versions are what `fs extract --replace` keeps. Versions a run read are kept (and listed)
    unless --force. The catalog forgets them first and the files go after, under the store lock; an
    interrupted gc leaves files the next writing command deletes.

    Example: fs gc --keep 2 --dry-run
    """
    from featurestore.pipelines.versions import gc as run_gc

    with common.open_store() as store:
        plan = run_gc(store, keep, dry_run=dry_run, force=force, names=feature_sets or None)
    verb = "would delete" if dry_run else "deleted"
    for v in plan.delete:
        used = f"; runs {','.join(map(str, v.runs))} lose it" if v.runs else ""
        common.err(f"{verb} {v.name} version {v.version} ({v.rows} rows, {v.shards} shard(s)){used}")
    for v in plan.referenced:
        common.err(f"kept {v.name} version {v.version}: read by run(s) {','.join(map(str, v.runs))} "
                   "(--force deletes it)")
    lost = plan.orphaned_runs
    if lost:
        common.err(f"run(s) {','.join(map(str, lost))} {'would' if dry_run else 'can'} no longer be reproduced "
                   "or predict (a feature-set version they read is gone)")
    common.err(f"{verb} {len(plan.delete)} version(s), kept {len(plan.referenced)} that runs read"
               + ("" if dry_run else f", {len(plan.deleted_files)} shard file(s) removed"))


def register(app: typer.Typer) -> None:
    app.command("versions")(versions)
    app.command("gc")(gc)
