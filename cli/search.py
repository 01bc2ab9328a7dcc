"""``fs search`` and ``fs duplicates``: the store as an embedding database."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import typer

from featurestore.cli import common

if TYPE_CHECKING:
    import numpy as np

    from featurestore.search.service import Found
    from featurestore.store import Store

WHERE_HELP = (
    "SQL condition on the images table, applied before ranking: columns id, source_path, label, "
    "superclass, width, height, format, mode, bytes, dataset_id, ingested_at, plus dataset (the "
    "dataset's name). Runs read-only. E.g. \"label = 'sneaker' AND dataset = 'spring'\"."
)
MEMORY_HELP = (
    "Memory budget in MiB (default FS_SEARCH_MEMORY_MB or 1024): feature sets that fit are loaded "
    "into memory, larger ones are streamed shard by shard."
)


class Metric(str, Enum):
    cosine = "cosine"
    l2 = "l2"


def search(
    features: str = typer.Option(..., "--features", "-F", help="Feature set to search (see `fs status`)."),
    image: str | None = typer.Option(None, "--image", "-i", help="Query with a new image file (or s3:// URL), "
                                     "embedded like the feature set's stored vectors (any size or mode)."),
    image_id: int | None = typer.Option(None, "--id", help="Query with an image already in the store "
                                        "(excluded from the results).", **common.ID_RANGE),
    k: int = typer.Option(10, "-k", "--top", help="Number of results."),
    where: str | None = typer.Option(None, "--where", "-w", help=WHERE_HELP),
    metric: Metric = typer.Option(Metric.cosine, "--metric", help="cosine: similarity, higher is better; "
                                  "l2: Euclidean distance, lower is better."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
    ingest: bool = typer.Option(False, "--ingest", help="Also add the --image file to the store, with its "
                                "vector in the feature set (after the search, so it does not match itself)."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Dataset for --ingest (default: the "
                                       "image's folder name)."),
    memory_mb: int | None = typer.Option(None, "--memory-mb", help=MEMORY_HELP),
    exact: bool = typer.Option(False, "--exact", help="Score every vector even if the feature set has an index "
                               "(`fs index build`); without one the search is always exact."),
    version: int | None = typer.Option(None, "--version", min=1, metavar="N", show_default=False,
                                       help="Search an older version of the set (see `fs versions SET`); default "
                                       "the newest."),
) -> None:
    """Find the images nearest to a query image in a feature set.

    Uses the feature set's approximate index when it has one (`fs index build`),
    else scores every vector; a line on stderr says which (and --format json/csv
    carry a `method` field per hit: index or exact). Prints rank, image id, path,
    label, distance (lower is better: 1 - cosine similarity, or the L2 distance
    with --metric l2) and, for cosine, similarity.

    Example: fs search --features efficientnet-lite0 --image shoe.jpg -k 5 --where "label != 'sandal'"
    """
    import numpy as np

    from featurestore.search.service import query_vector
    from featurestore.search.service import search as run_search

    if (image is None) == (image_id is None):
        raise typer.BadParameter("give exactly one of --image PATH or --id N", param_hint="--image/--id")
    if k < 1:
        raise typer.BadParameter("must be at least 1", param_hint="-k")
    if ingest and image is None:
        raise typer.BadParameter("--ingest needs --image", param_hint="--ingest")
    if dataset and not ingest:
        raise typer.BadParameter("--dataset is only used with --ingest", param_hint="--dataset")
    if memory_mb is not None and memory_mb < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--memory-mb")
    if ingest and version is not None:
        raise typer.BadParameter("--ingest adds to the newest version; leave out --version", param_hint="--ingest")
    store = common.open_store(search_memory_mb=memory_mb)
    try:
        if version is not None:  # an older version is searched through its own catalog row
            features = store.feature_set(features, version).name
        query: object = image_id if image_id is not None else image
        if ingest:
            # embed once: the same vector is searched and then stored
            query = query_vector(store, features, image)[0]
        results = run_search(store, features, query, k=k, where=where, metric=metric.value, exact=exact)
        if ingest:
            assert image is not None and isinstance(query, np.ndarray)
            added = _ingest(store, features, image, dataset, query)
    finally:
        store.close()
    rows = [r.as_dict() for r in results]
    cols = ["rank", "image_id", "path", "label", "distance"] + (["similarity"] if metric == Metric.cosine else [])
    common.emit(rows, fmt, cols if fmt == common.Format.table else [*cols, "method"])
    common.err(_how(results, exact, features))
    if not rows and where:
        common.err(f"no results: no other image with a vector in {features} matches --where")
    if ingest:
        common.err(added)


def _how(found: Found, exact: bool, features: str) -> str:
    """The stderr line saying whether the ANN index or exact search answered."""
    if found.method == "index":
        from featurestore.search.index_query import INDEX_BUILD_ADDS

        return f"search: {found.note}".replace(INDEX_BUILD_ADDS, f"`fs index build --features {features}` adds them")
    if exact:
        return "search: exact (--exact)"
    return f"search: exact ({found.note})" if found.note else "search: exact (no index; `fs index build` makes one)"


def _ingest(store: Store, features: str, image: str, dataset: str | None, vector: np.ndarray) -> str:
    from featurestore.pipelines.ingest import ingest as run_ingest
    from featurestore.search.service import add_image

    with store.writing():
        summary = run_ingest(store, image, dataset=dataset)
        if summary.failed:
            return f"not ingested: {summary.failed[0][0]}: {summary.failed[0][1]}"
        image_id = summary.image_ids[0]
        wrote = add_image(store, features, image_id, vector)
    state = "new image" if summary.new else "already in the store"
    vec = f"vector added to {features}" if wrote else f"already has a vector in {features}"
    return f"ingested {image} as image {image_id} ({state}; {vec})"


def duplicates(
    features: str = typer.Option(..., "--features", "-F", help="Feature set to compare (see `fs status`)."),
    threshold: float = typer.Option(0.97, "--threshold", "-t", help="Minimum cosine similarity, in [-1, 1]; "
                                    "groups are transitive (a~b and b~c put a, b, c together)."),
    where: str | None = typer.Option(None, "--where", "-w", help=WHERE_HELP),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
    memory_mb: int | None = typer.Option(None, "--memory-mb", help="Memory budget in MiB (default "
                                         "FS_SEARCH_MEMORY_MB or 1024); without an index the feature set "
                                         "must fit."),
    exact: bool = typer.Option(False, "--exact", help="Compare every pair even if the feature set has a cosine "
                               "index (`fs index build`)."),
    expansion: int | None = typer.Option(None, "--expansion", help="With an index: candidates each vector's "
                                         "query keeps (default 256); more finds more of the groups, slower."),
) -> None:
    """List groups of near-duplicate images (cosine similarity >= --threshold in a feature set).

    With a cosine index (`fs index build`) each vector asks the index for its
    neighbours, so memory stays bounded at millions of vectors; without one
    the whole set is compared in memory (exact).

    Example: fs duplicates --features rp128 --threshold 0.98 --format csv
    """
    from featurestore.search.service import duplicates as run_duplicates

    if not -1.0 <= threshold <= 1.0:
        raise typer.BadParameter("must be a cosine similarity in [-1, 1]", param_hint="--threshold")
    if memory_mb is not None and memory_mb < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--memory-mb")
    if expansion is not None and not 1 <= expansion <= 65_536:
        raise typer.BadParameter("must be between 1 and 65536", param_hint="--expansion")
    store = common.open_store(search_memory_mb=memory_mb)
    try:
        with common.progress(f"duplicates in {features}") as update:
            found = run_duplicates(store, features, threshold=threshold, where=where, exact=exact,
                                   progress=update, expansion=expansion)
    finally:
        store.close()
    rows = [{"group": d.group, "image_id": d.image_id, "path": d.path, "label": d.label} for d in found]
    common.emit(rows, fmt, ["group", "image_id", "path", "label"])
    groups = len({d.group for d in found})
    common.err(f"{groups} group(s) of near duplicates, {len(found)} images (threshold {threshold}); "
               + (f"via the {found.note}" if found.method == "index" else "exact"))


def register(app: typer.Typer) -> None:
    app.command("search")(search)
    app.command("duplicates")(duplicates)
