"""``fs index``: approximate nearest-neighbour (HNSW) indexes over feature sets."""

from __future__ import annotations

from enum import Enum

import typer

from featurestore.cli import common

app = typer.Typer(
    help="Build, list and drop approximate nearest-neighbour (HNSW) indexes that make `fs search`, "
         "`fs duplicates` and `fs serve` fast on large feature sets.\n\n"
         "Example: fs index build --features efficientnet-lite0 && fs index list",
    no_args_is_help=True,
)


class Metric(str, Enum):
    cosine = "cosine"
    l2 = "l2"


class Dtype(str, Enum):
    f32 = "f32"
    f16 = "f16"
    i8 = "i8"


def _names(features: list[str]) -> list[str]:
    names = [n.strip() for value in features for n in value.split(",") if n.strip()]
    if not names:
        raise typer.BadParameter("name at least one feature set, e.g. --features efficientnet-lite0",
                                 param_hint="--features")
    return list(dict.fromkeys(names))


def _check_range(value: int | None, low: int, high: int, option: str) -> None:
    if value is not None and not low <= value <= high:
        raise typer.BadParameter(f"must be between {low} and {high}", param_hint=option)


@app.command("build")
def build(
    features: list[str] = typer.Option(..., "--features", "-F", help="Feature set(s) to index (repeat the option "
                                       "or separate with commas; see `fs status`)."),
    metric: Metric | None = typer.Option(None, "--metric", help="cosine (similarity) or l2 (Euclidean distance); "
                                         "searches with the other metric stay exact. Default: the current "
                                         "index's, else cosine."),
    dtype: Dtype | None = typer.Option(None, "--dtype", help="Vector storage in the index: f32 (exact scores), f16 "
                                       "(half the size) or i8 (a quarter; cosine only). Default: the current "
                                       "index's, else f32."),
    connectivity: int | None = typer.Option(None, "--connectivity", "-M", help="HNSW edges per node (2-256): "
                                            "more gives better recall and a bigger index. Default 16."),
    expansion_add: int | None = typer.Option(None, "--expansion-add", help="Candidates kept while inserting "
                                             "(efConstruction): more gives a better graph and a slower build. "
                                             "Default 128."),
    expansion_search: int | None = typer.Option(None, "--expansion-search", help="Candidates kept while "
                                                "searching (ef): more gives better recall and slower queries; "
                                                "changing only this does not rebuild. Default 128."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build from scratch even if only new shards would "
                                 "need adding."),
    backend: str = typer.Option("usearch", "--backend", help="Index library: usearch (built in) or one a plugin "
                                "adds (`fs plugins` lists them)."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
) -> None:
    """Build or update the HNSW index of feature sets (usearch), stored crash-safely in the store.

    A second run adds only the shards written since (new `fs extract` output,
    `fs compact` results); until then searches score those vectors exactly, so
    nothing is missed. Changed --metric/--dtype/--connectivity/--expansion-add
    rebuild the index.

    Example: fs index build --features efficientnet-lite0 --dtype i8 --expansion-search 200
    """
    from featurestore.search.backends import index_backends

    if backend not in (found := index_backends()):
        raise typer.BadParameter(f"use {' or '.join(found)}", param_hint="--backend")
    build_index = found[backend].build
    from featurestore.search.index import REBUILD_ASKED  # the reason the library gives a rebuild asked for
    names = _names(features)
    _check_range(connectivity, 2, 256, "--connectivity")
    _check_range(expansion_add, 1, 65_536, "--expansion-add")
    _check_range(expansion_search, 1, 65_536, "--expansion-search")
    if dtype == Dtype.i8 and metric == Metric.l2:
        raise typer.BadParameter("an i8 index only supports --metric cosine (it normalises the vectors); "
                                 "use --dtype f16 or f32 for l2", param_hint="--dtype")
    store = common.open_store()
    rows = []
    try:
        for name in names:
            with common.progress(f"indexing {name}") as update:
                r = build_index(store, name, metric=metric.value if metric else None,
                                dtype=dtype.value if dtype else None, connectivity=connectivity,
                                expansion_add=expansion_add, expansion_search=expansion_search, rebuild=rebuild,
                                progress=update)
            size = f"{r.bytes / 2**20:,.1f} MiB"
            because = "--rebuild asked for" if r.reason == REBUILD_ASKED else r.reason
            what = {"created": f"built an index of {r.vectors:,} vectors",
                    "rebuilt": f"rebuilt the index ({because}): {r.vectors:,} vectors",
                    "extended": f"added {r.added:,} vectors ({r.reason}); {r.vectors:,} in the index",
                    "updated": f"recorded {r.reason} (no rebuild needed)",
                    "unchanged": f"index up to date ({r.vectors:,} vectors, {r.reason})"}[r.action]
            skipped = f"; {r.skipped_shards} shard(s) compacted meanwhile stay exact" if r.skipped_shards else ""
            common.err(f"{name}: {what}, {r.params.metric}, {r.params.dtype}, M={r.params.connectivity}, "
                       f"{size} in {r.seconds:.1f}s{skipped}")
            rows.append({"feature_set": name, "action": r.action, "vectors": r.vectors, "added": r.added,
                         "removed": r.removed, "seconds": round(r.seconds, 3), "mib": round(r.bytes / 2**20, 3),
                         "path": str(r.path) if r.path else None})
    finally:
        store.close()
    common.emit(rows, fmt, ["feature_set", "action", "vectors", "added", "removed", "seconds", "mib", "path"])


@app.command("list")
def list_(
    verify: bool = typer.Option(False, "--verify", help="Also re-hash every index file and compare it with the "
                                "sha256 recorded in the catalog (reads each file once)."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
) -> None:
    """List the indexes: params, vectors, and how many shards/vectors of their feature set they cover.

    `uncovered` counts vectors written since the build (searched exactly until
    the next `fs index build`).

    Example: fs index list --verify
    """
    from featurestore.search.backends import index_backend

    list_indexes = index_backend().list

    store = common.open_store()
    try:
        found = list_indexes(store, verify=verify)
    finally:
        store.close()
    cols = ["feature_set", "metric", "dtype", "connectivity", "expansion_add", "expansion_search", "vectors",
            "shards", "uncovered", "mib", "created_at"] + (["sha256_ok"] if verify else [])
    rows = [{"feature_set": s.feature_set, "metric": s.params.metric, "dtype": s.params.dtype,
             "connectivity": s.params.connectivity, "expansion_add": s.params.expansion_add,
             "expansion_search": s.params.expansion_search, "vectors": s.record.vectors,
             "shards": f"{s.covered_shards}/{s.live_shards}", "uncovered": s.uncovered_vectors,
             "mib": round(s.record.bytes / 2**20, 3), "created_at": s.record.created_at.isoformat(" ", "seconds"),
             "sha256_ok": s.sha256_ok} for s in found]
    common.emit(rows, fmt, cols)
    if not found:
        common.err("no indexes yet: build one with `fs index build --features NAME`")
    bad = [s.feature_set for s in found if s.sha256_ok is False]
    if bad:
        common.err(f"Error: index file(s) of {', '.join(bad)} do not match their sha256: rebuild with "
                   "`fs index build --features NAME --rebuild`")
        raise typer.Exit(1)


@app.command("drop")
def drop(name: str = typer.Argument(..., help="Feature set whose index to remove (its vectors stay).")) -> None:
    """Remove the index of a feature set (file and catalog entry); searches become exact again.

    Example: fs index drop efficientnet-lite0
    """
    from featurestore.search.backends import index_backend

    drop_index = index_backend().drop

    store = common.open_store()
    try:
        path = drop_index(store, name)
    finally:
        store.close()
    common.err(f"dropped the index of {name} ({path})")


def register(app_: typer.Typer) -> None:
    app_.add_typer(app, name="index")
