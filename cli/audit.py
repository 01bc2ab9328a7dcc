"""``fs audit``: label mistakes (issue 24), near-duplicate leaks across datasets or splits, outliers and bad photos
(issue 25)."""

from __future__ import annotations

import json

import typer

from featurestore.cli import common

app = typer.Typer(help="Audit the catalog: label mistakes, near-duplicate leaks, outliers, bad photos.",
                  no_args_is_help=True)

FORMAT = typer.Option(common.Format.table, "--format", "-f", help="Output format.")
SHOW = typer.Option(20, "--show", help="Rows to print (every finding is stored).")


def _threshold(value: float) -> float:
    from featurestore.errors import InvalidInputError
    from featurestore.search.groups import check_threshold

    try:
        return check_threshold(value)
    except InvalidInputError as exc:
        raise typer.BadParameter(common.error_text(exc), param_hint="--threshold") from None


@app.command("leaks")
def leaks(
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Dataset A (alone: pairs inside it)."),
    against: str | None = typer.Option(None, "--against", help="Dataset B: pairs with one image in A, one in B."),
    run: int | None = typer.Option(None, "--run", help="Pairs across the training and test images of each split "
                                   "of this run.", **common.ID_RANGE),
    threshold: float = typer.Option(0.95, "--threshold", help="Cosine similarity in (0, 1] at which two images "
                                    "are near-duplicates."),
    features: str | None = typer.Option(None, "--features", help="Feature set compared (default: the run's "
                                        "grouping set or first CNN set, else the store's first CNN set)."),
    exact: bool = typer.Option(False, "--exact", help="Compare every pair even when the set has an index."),
    fmt: common.Format = FORMAT, show: int = SHOW,
) -> None:
    """Near-duplicate pairs that leak between two datasets, or between the splits of a run.

    Both ids, their labels and the similarity, most similar first; stored as `leak` findings
    (`/ui/browse?finding=leak`, `fs sql "SELECT * FROM audit_findings WHERE kind = 'leak'"`).

    Example: fs audit leaks --dataset train --against test --threshold 0.95
    """
    from featurestore.pipelines.audit import audit_leaks

    threshold = _threshold(threshold)
    store = common.open_store()
    try:
        with common.progress("leaks") as tick:
            rep = audit_leaks(store, threshold, dataset, against, run, features, exact, tick)
    finally:
        store.close()
    rows = [{"a": x.a, "b": x.b, "similarity": x.similarity, "a_label": x.a_label, "b_label": x.b_label,
             "where": x.where} for x in rep.leaks]
    common.emit(rows if fmt != common.Format.table else rows[:show], fmt,
                ["a", "b", "similarity", "a_label", "b_label", "where"])
    common.err(f"{len(rep.leaks)} near-duplicate pair(s) at cosine >= {rep.threshold:g} in {rep.feature_set} "
               f"among {rep.examined} images ({rep.method}, {rep.seconds:.1f} s); stored in audit_findings")


@app.command("outliers")
def outliers(
    features: str = typer.Option(..., "--features", help="Feature set whose distances are measured."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Only images of this dataset."),
    k: int = typer.Option(10, "--k", min=1, help="Neighbours averaged."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out images lacking the set."),
    fmt: common.Format = FORMAT, show: int = SHOW,
) -> None:
    """Images far from their own class and from everything, worst first.

    to_all / to_class: mean cosine distance to the k nearest images / of the same label.
    score: the larger of each over its far-out fence (Q3 + 3 IQR over the images); outlier when > 1.
    Outliers are stored as `outlier` findings (`/ui/browse?finding=outlier`).

    Example: fs audit outliers --features efficientnet-lite0 --dataset spring
    """
    from featurestore.pipelines.audit import audit_outliers

    store = common.open_store()
    try:
        rep = audit_outliers(store, features, dataset, k, skip_missing)
    finally:
        store.close()
    rows = [{"image_id": r.image_id, "label": r.label, "to_class": r.to_class, "to_all": r.to_all,
             "score": r.score, "outlier": "yes" if r.outlier else ""} for r in rep.rows]
    common.emit(rows if fmt != common.Format.table else rows[:show], fmt)
    common.err(f"{rep.n_outliers} outlier(s) of {len(rep.rows)} images in {rep.feature_set} (k={rep.k}; fences: "
               f"to_all {rep.fence_all:.4f}, to_class {rep.fence_class:.4f}); stored in audit_findings")


@app.command("images")
def images(
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Only images of this dataset."),
    fmt: common.Format = FORMAT, show: int = SHOW,
) -> None:
    """Photos that are blurred, very dark or bright, near-constant, tiny or of an odd aspect ratio.

    Measured on each image's 256-px thumbnail (cached for the web app); the definitions and
    thresholds are printed with each finding. Stored as findings (`/ui/browse?finding=blurred`).

    Example: fs audit images --dataset spring --format csv
    """
    from featurestore.pipelines.audit import audit_images

    store = common.open_store()
    try:
        with common.progress("images") as tick:
            rep = audit_images(store, dataset, tick)
    finally:
        store.close()
    rows = [{"image_id": r.image_id, "finding": r.kind, "value": r.value, "definition": r.definition,
             "path": r.path} for r in rep.rows]
    common.emit(rows if fmt != common.Format.table else rows[:show], fmt,
                ["image_id", "finding", "value", "definition", "path"])
    for path, reason in rep.unreadable:
        common.err(f"  not measured: {path}: {reason}")
    counts = {}
    for r in rep.rows:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no findings"
    common.err(f"{rep.examined} images examined: {summary}"
               + (f"; {len(rep.unreadable)} could not be read (size checks only)" if rep.unreadable else ""))


@app.command("labels")
def labels(
    run: int = typer.Option(..., "--run", help="A run evaluated with --folds (see `fs runs`).", **common.ID_RANGE),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
    limit: int | None = typer.Option(None, "--limit", min=0, help="Rows to print, worst first (default: every "
                                     "flagged image on a table, every image in csv/json)."),
    filter_by: str = typer.Option("both", "--filter-by", help="cleanlab's find_label_issues method: both "
                                  "(default: flagged both per class and per noise rate), prune_by_noise_rate "
                                  "(cleanlab's default), prune_by_class, confident_learning, predicted_neq_given."),
    min_confidence: float = typer.Option(0.0, "--min-confidence", min=0.0, max=1.0, help="Flag an image only "
                                         "when its suggested class has at least this out-of-fold probability "
                                         "(0: every image cleanlab flags)."),
    neighbour_weight: float = typer.Option(0.5, "--neighbour-weight", min=0.0, max=1.0, help="Share of the "
                                           "run's out-of-fold neighbour votes (fs train/evaluate --neighbours) "
                                           "in the probabilities judged; the rest is the fold models'. 0: the "
                                           "models' alone. A run without votes is judged on the models'."),
) -> None:
    """Rank the labels of a K-fold run's images by how likely they are wrong (cleanlab, confident learning).

    Reads the run's stored out-of-fold probabilities (`fs evaluate --folds K`), averaged with its
    out-of-fold neighbour votes (--neighbour-weight); fits no model. One row per
    labelled image of the run, worst first: the given label, the most probable other class (suggested),
    cleanlab's label-quality score (lower is worse) and whether cleanlab flags it; plus cleanlab's estimate
    of how many labels are wrong. `confidence` is the suggested class's probability as judged. Fix them
    with `fs labels set --id N LABEL` or `fs labels import FILE.csv`.

    Example: fs evaluate --features efficientnet-lite0 --folds 5 --classifier logreg-strong && fs audit labels --run 1
    """
    from featurestore.pipelines.labels import audit_labels
    from featurestore.training.label_issues import FILTERS

    if filter_by not in FILTERS:
        raise typer.BadParameter(f"must be one of {', '.join(FILTERS)}", param_hint="--filter-by")
    store = common.open_store()
    try:
        audit = audit_labels(store, run, filter_by, min_confidence, neighbour_weight)
    finally:
        store.close()
    rows = audit.rows
    if limit is not None:
        rows = rows[:limit]
    elif fmt == common.Format.table:
        rows = [r for r in rows if r.flagged]
    out = [{"image_id": r.image_id, "label": r.label, "suggested": r.suggested, "quality": round(r.quality, 6),
            "confidence": round(r.confidence, 6), "flagged": r.flagged, "fold": r.fold} for r in rows]
    if fmt == common.Format.json:
        typer.echo(json.dumps({"run": audit.run_id, "images": len(audit.rows), "flagged": audit.n_flagged,
                               "estimated_issues": audit.estimated_issues,
                               "neighbour_weight": audit.neighbour_weight, "rows": out}, indent=2))
    else:
        common.emit(out, fmt, ["image_id", "label", "suggested", "quality", "confidence", "flagged", "fold"])
    judged = (f"fold models' probabilities and neighbour votes, weight {audit.neighbour_weight:g}"
              if audit.neighbour_weight else "fold models' probabilities")
    common.err(f"run {audit.run_id}: {len(audit.rows)} images, {audit.n_flagged} flagged, cleanlab estimates "
               f"{audit.estimated_issues} wrong label(s) ({judged}); shown {len(out)}")
