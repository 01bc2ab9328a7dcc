"""``fs train``, ``fs evaluate``, ``fs compare``, ``fs predict`` and ``fs runs``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from featurestore.cli import common
from featurestore.cli.versions import VERSION_HELP, parse_version
from featurestore.errors import InvalidInputError

if TYPE_CHECKING:
    from featurestore.pipelines.train import Grouping, TrainConfig


def _features(value: str) -> list[str]:
    names = [f.strip() for f in value.split(",") if f.strip()]
    if not names:
        raise typer.BadParameter("give feature sets like rp128,efficientnet-lite0", param_hint="--features")
    return names


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if std is not None else f"{100 * mean:.1f}"


TARGET = typer.Option("label", "--target", help="What to predict: label (class) or superclass.")
SELECT = typer.Option(None, "--select", help="Per-set RF-importance selection: NAME=K|auto|none,... or "
                      "auto/none for all. Default: none for one set, auto for several (Two-Flow).")
CLASSIFIER = typer.Option("rf", "--classifier", help="Final classifier: rf (paper), logreg, logreg-cv "
                          "(its C chosen by 3-fold CV on the training images), logreg-strong (C = 0.01: "
                          "out-of-fold probabilities for `fs audit labels`), hgb or mlp (one hidden "
                          "layer of 1,024 units, stopped early on a tenth of the training images).")
TREES = typer.Option(200, "--trees", help="Trees of the final Random Forest (hgb: boosting rounds).")
SPLITS = typer.Option(10, "--splits", help="Repeated random train/test splits.")
TEST_SIZE = typer.Option(0.1, "--test-size", help="Test fraction of each split.")
SEED = typer.Option(0, "--seed", help="Seed of the splits and the forests.")
DATASET = typer.Option(None, "--dataset", "-d", help="Only images of this dataset.")
SKIP = typer.Option(False, "--skip-missing", help="Leave out images lacking a feature set instead of failing.")
TEST_DATASET = typer.Option(None, "--test-dataset", help="Score on this fixed held-out dataset (one split: "
                            "train on the selected images, test on it) instead of repeated random splits. "
                            "Images in both are left out of training, and counted.")
FOLDS = typer.Option(None, "--folds", min=2, help="Stratified K-fold instead of --splits: every labelled image is "
                     "scored once by the fold model that did not train on it, and its class probabilities are "
                     "kept (table run_oof) for `fs audit labels`.")
NEIGHBOURS = typer.Option(None, "--neighbours", min=0, show_default=False,
                          help="With --folds: also keep each image's vote of its N nearest images (cosine, each "
                          "feature set weighted equally) among the training part of its fold; `fs audit labels` "
                          "averages it with the fold models' probabilities. Default 10; 0 keeps none.")
GROUP_DUPLICATES = typer.Option(None, "--group-duplicates", metavar="THRESHOLD", show_default=False,
                                help="Keep near-duplicates (cosine similarity >= THRESHOLD, in (0, 1], e.g. 0.95; "
                                "joined transitively) on one side of every split; with --test-dataset, leave out "
                                "training images that are near-duplicates of a test image (counted).")
GROUP_FEATURES = typer.Option(None, "--group-features", metavar="SET", show_default=False,
                              help="Feature set compared by --group-duplicates (default: the first CNN set of "
                              "--features); through its index when it has one (`fs index build`).")
VERSION = typer.Option(None, "--version", metavar="N|SET=N,...", show_default=False, help=VERSION_HELP)


def _cfg(features: list[str], target: str, select: str | None, classifier: str, trees: int, splits: int,
         test_size: float, seed: int, dataset: str | None, skip_missing: bool,
         test_dataset: str | None = None, folds: int | None = None, group_duplicates: float | None = None,
         group_features: str | None = None, version: str | None = None,
         neighbours: int | None = None) -> TrainConfig:
    from featurestore.pipelines.train import TrainConfig

    cfg = TrainConfig(features, target, select, classifier, trees, splits, test_size, seed, dataset, skip_missing,
                      test_dataset, folds, group_duplicates, group_features, parse_version(version), neighbours)
    try:
        cfg.check()
    except InvalidInputError as exc:
        raise typer.BadParameter(common.error_text(exc)) from None
    return cfg


def train(
    features: str = typer.Option(..., "--features", help="Comma-separated feature sets to stack."),
    target: str = TARGET, select: str | None = SELECT, classifier: str = CLASSIFIER, trees: int = TREES,
    splits: int = SPLITS, test_size: float = TEST_SIZE, seed: int = SEED, dataset: str | None = DATASET,
    skip_missing: bool = SKIP, test_dataset: str | None = TEST_DATASET, folds: int | None = FOLDS,
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
    ray: str | None = common.RAY_OPTION,
    group_duplicates: float | None = GROUP_DUPLICATES, group_features: str | None = GROUP_FEATURES,
    version: str | None = VERSION, neighbours: int | None = NEIGHBOURS,
) -> None:
    """Evaluate a feature combination on repeated splits, then fit the final model on all labelled images.

    With --test-dataset: train on the selected images (minus any that are also in the
    test dataset), score on the test dataset, and keep that model.

    Per-split scores, the run's settings and the model's sha256 are stored; predict with `fs predict --run ID`.
    With --ray the splits run in parallel on a Ray cluster (same scores). With --folds K every labelled image
    is scored once out of fold and its class probabilities are kept for `fs audit labels --run ID`.

    With --group-duplicates 0.95, near-duplicate photos never straddle a split (see README "Honest splits").
    The run records the version of each feature set it read (--version N for an older one; `fs versions SET`).

    Example: fs train --features rp128,efficientnet-lite0 --select rp128=55,efficientnet-lite0=400
    """
    from featurestore.pipelines.train import train as run_train

    cfg = _cfg(_features(features), target, select, classifier, trees, splits, test_size, seed, dataset,
               skip_missing, test_dataset, folds, group_duplicates, group_features, version, neighbours)
    store = common.open_store(ray_address=ray)
    try:
        with store.writing(), common.progress("splits") as tick:
            out = run_train(store, cfg, progress=tick, ray_address=store.settings.ray_address)
    finally:
        store.close()
    s = out.evaluation.summary
    result = {"run": out.run_id, "features": ",".join(cfg.features), "images": out.n_images,
              "classes": out.n_classes, "splits": _scheme(cfg, out.split_scheme),
              "accuracy": _pm(s["accuracy"].mean, s["accuracy"].std),
              "macro_f1": _pm(s["macro_f1"].mean, s["macro_f1"].std),
              "superclass_accuracy": _pm(s["superclass_accuracy"].mean, s["superclass_accuracy"].std)
              if "superclass_accuracy" in s else "",
              "kept": ", ".join(f"{k}={v}" for k, v in out.kept.items())}
    if fmt == common.Format.json:
        grouping = out.grouping.as_dict() if out.grouping else None
        typer.echo(json.dumps({**result, "evaluation": out.evaluation.to_dict(), "grouping": grouping}, indent=2))
        return
    common.emit([result], fmt)
    _overlap_note(cfg, out.excluded, out.grouping)
    _grouping_note(out.grouping)
    common.err(f"run {out.run_id} stored; splits were {out.split_scheme}; predict with "
               f"`fs predict --run {out.run_id} --unlabelled`")


def evaluate(
    features: list[str] = typer.Option(..., "--features", help="A combination (comma-separated); repeat the "
                                       "option for each row of the table. The first row is the baseline."),
    target: str = TARGET, select: str | None = SELECT, classifier: str = CLASSIFIER, trees: int = TREES,
    splits: int = SPLITS, test_size: float = TEST_SIZE, seed: int = SEED, dataset: str | None = DATASET,
    skip_missing: bool = SKIP, test_dataset: str | None = TEST_DATASET, folds: int | None = FOLDS,
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
    ray: str | None = common.RAY_OPTION,
    group_duplicates: float | None = GROUP_DUPLICATES, group_features: str | None = GROUP_FEATURES,
    version: str | None = VERSION, neighbours: int | None = NEIGHBOURS,
) -> None:
    """Evaluate several feature combinations on the same splits and print a Table-1-style comparison.

    Each row is stored as a run (no final model is fitted; use `fs train` for that) and
    can be paired with `fs compare`.

    With --ray every (combination, split) is a task on a Ray cluster, all in parallel (same scores).

    Example: fs evaluate --features rp128 --features efficientnet-lite0 --features rp128,efficientnet-lite0
    """
    from featurestore.pipelines.train import evaluate_many

    if select not in (None, "auto", "none"):
        raise typer.BadParameter("fs evaluate takes auto or none (per-set K: use fs train)", param_hint="--select")
    combos = [_features(f) for f in features]
    cfg = _cfg(combos[0], target, select, classifier, trees, splits, test_size, seed, dataset, skip_missing,
               test_dataset, folds, group_duplicates, group_features, version, neighbours)
    store = common.open_store(ray_address=ray)
    try:
        with store.writing(), common.progress("evaluate") as tick:
            outs = evaluate_many(store, combos, cfg, progress=lambda label, d, t: tick(d, t),
                                 ray_address=store.settings.ray_address)
    finally:
        store.close()
    base = outs[0].evaluation.summary["accuracy"].mean
    rows = []
    for combo, o in zip(combos, outs, strict=True):
        s = o.evaluation.summary
        rows.append({"run": o.run_id, "features": "+".join(combo),
                     "accuracy": _pm(s["accuracy"].mean, s["accuracy"].std),
                     "gain": f"{100 * (s['accuracy'].mean - base):+.1f}",
                     "macro_f1": _pm(s["macro_f1"].mean, s["macro_f1"].std),
                     "superclass_accuracy": _pm(s["superclass_accuracy"].mean, s["superclass_accuracy"].std)
                     if "superclass_accuracy" in s else ""})
    common.emit(rows, fmt)
    _overlap_note(cfg, outs[0].excluded, outs[0].grouping)
    _grouping_note(outs[0].grouping)
    common.err(f"{outs[0].n_images} images, {outs[0].n_classes} classes, {_scheme(cfg, outs[0].split_scheme)}, "
               f"classifier {classifier}, selection {select or 'default'}")


def _scheme(cfg: TrainConfig, scheme: str) -> str:
    if cfg.test_dataset is not None:
        return f"fixed test dataset {cfg.test_dataset}"
    if cfg.folds is not None:
        return f"{cfg.folds} folds ({scheme}; out-of-fold probabilities kept)"
    return f"{cfg.n_splits} x {cfg.test_size:g} splits ({scheme})"


def _overlap_note(cfg: TrainConfig, excluded: int, grouping: Grouping | None = None) -> None:
    excluded -= grouping.near_excluded if grouping else 0  # the near copies get their own line
    if cfg.test_dataset is not None and excluded:
        where = f"--dataset {cfg.dataset}" if cfg.dataset else "the labelled images"
        common.err(f"{excluded} image(s) of {where} are also in the test dataset {cfg.test_dataset}: "
                   "left out of training (stored with the run as n_test_overlap)")


def _grouping_note(g: Grouping | None) -> None:
    if g is None:
        return
    common.err(f"near-duplicates (cosine >= {g.threshold:g} in {g.feature_set}, {g.method}, {g.seconds:.1f} s): "
               f"{g.n_groups} group(s) of {g.n_grouped} images (largest {g.largest}) kept on one side of every split"
               + (f"; {g.near_excluded} training image(s) near-duplicate of a test image left out"
                  if g.near_excluded else ""))
    if g.unsplittable:
        shown = ", ".join(g.unsplittable[:10]) + (" ..." if len(g.unsplittable) > 10 else "")
        common.err(f"warning: {len(g.unsplittable)} class(es) lie in a single near-duplicate group, so no split "
                   f"trains and tests them both (their images stay, splits are unstratified): {shown}")


def compare(
    run_a: int = typer.Argument(..., help="First run id.", **common.ID_RANGE),
    run_b: int = typer.Argument(..., help="Second run id.", **common.ID_RANGE),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence level of the interval."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
) -> None:
    """Paired two-sided test of two runs' test accuracy (A - B).

    Runs over the same random splits: a t-test of the per-split accuracies. Runs scored on the same
    fixed test dataset (--test-dataset): McNemar's exact test of the images only one of them got right.

    Example: fs compare 3 1
    """
    from featurestore.pipelines.compare import compare as run_compare
    from featurestore.training.stats import McNemarTest

    store = common.open_store()
    try:
        c = run_compare(store, run_a, run_b, confidence)
    finally:
        store.close()
    t = c.test
    row: dict[str, Any] = {"run_a": run_a, "features_a": ",".join(c.run_a.features), "run_b": run_b,
                           "features_b": ",".join(c.run_b.features), "mean_diff": t.mean_diff, "ci_low": t.ci_low,
                           "ci_high": t.ci_high}
    verdict = "significant" if t.pvalue < 1 - confidence else "not significant"
    interval = (f"A - B = {100 * t.mean_diff:+.2f} points, {int(confidence * 100)}% CI "
                f"[{100 * t.ci_low:+.2f}, {100 * t.ci_high:+.2f}]")
    if c.labels_note:
        common.err(f"note: {c.labels_note}")
    if isinstance(t, McNemarTest):
        row.update(test="mcnemar", a_only=t.a_only, b_only=t.b_only, pvalue=t.pvalue, n=t.n)
        common.emit([row], fmt)
        common.err(f"{interval}; McNemar: only A right on {t.a_only}, only B right on {t.b_only} of {t.n} test "
                   f"images, p = {t.pvalue:.4g} ({verdict} at {1 - confidence:g})")
        return
    row.update(statistic=t.statistic, pvalue=t.pvalue, n=t.n)
    common.emit([row], fmt)
    from featurestore.training.evaluation import KFOLD_SCHEMES

    paired = "fold by fold" if c.run_a.split_scheme in KFOLD_SCHEMES else "split by split"
    common.err(f"{interval}, t = {t.statistic:.3f}, p = {t.pvalue:.4g} ({verdict} at {1 - confidence:g}; "
               f"paired {paired})")


def predict(
    run: int = typer.Option(..., "--run", help="Run whose final model predicts.", **common.ID_RANGE),
    paths: list[Path] = typer.Argument(None, help="Image files or folders (ingested and featurized first)."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Predict every image of this dataset."),
    unlabelled: bool = typer.Option(False, "--unlabelled", help="Predict every image without a label."),
    ingest_dataset: str = typer.Option("predict", "--into", help="Dataset name for ingested PATHs."),
    batch: int = typer.Option(32, "--batch", help="Images per extraction batch."),
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format."),
    show: int = typer.Option(20, "--show", help="Rows to print (all are stored)."),
) -> None:
    """Predict with a run's model and store one row per image in the predictions table.

    Re-predicting replaces the run's rows for those images. Query them with `fs sql`.

    Example: fs predict --run 1 --unlabelled
    """
    from featurestore.pipelines.ingest import ingest
    from featurestore.pipelines.predict import predict as run_predict

    if sum(bool(x) for x in (paths, dataset, unlabelled)) != 1:
        raise typer.BadParameter("give exactly one of PATH..., --dataset NAME or --unlabelled")
    store = common.open_store()
    try:
        with store.writing():
            ids: list[int] = []
            if paths:
                for p in paths:
                    summary = ingest(store, p, dataset=ingest_dataset, labels="none")
                    for fp, reason in summary.failed:
                        common.err(f"  skipped: {fp}: {reason}")
                    ids += summary.image_ids
            else:
                rows = store.select_images(dataset=dataset)
                ids = [r.id for r in rows if not unlabelled or r.label is None]
            with common.progress("featurize") as tick:
                out = run_predict(store, run, ids, batch_size=batch, progress=tick)
            paths_of = {r.id: r.source_path for r in store.select_images(image_ids=[r["image_id"] for r in out.rows])}
    finally:
        store.close()
    for fp, reason in out.skipped:
        common.err(f"  skipped: {fp}: {reason}")
    shown = [{"image_id": r["image_id"], "path": paths_of.get(r["image_id"]), "label": r["label"],
              "probability": r["probability"]} for r in out.rows[:show]]
    common.emit(shown, fmt)
    common.err(f"{out.predicted} predictions stored for run {out.run_id} (table predictions)")


def runs(fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format.")) -> None:
    """List training and evaluation runs with their scores.

    Example: fs runs --format csv
    """
    from featurestore.pipelines.train import list_runs

    store = common.open_store()
    try:

        names = store.catalog.run_names()
        found = list_runs(store)
        pins = store.catalog.run_pins([r.id for r in found])
        rows = [{"run": r.id, "name": names.get(r.id, ""), "created": r.created_at.strftime("%Y-%m-%d %H:%M"),
                 "features": ",".join(r.features),
                 "versions": ",".join(f"{n}=v{v}" for n, v in pins.get(r.id, {}).items()),
                 "classifier": r.classifier, "target": r.target, "images": r.n_images,
                 "splits": _splits_cell(r), "accuracy": _pm(r.accuracy_mean, r.accuracy_std),
                 "macro_f1": _pm(r.macro_f1_mean, None), "model": "yes" if r.artifact_path else "",
                 "group": (r.comparison_group or "")[:8], "labels": r.label_version or 0}
                for r in found]
    finally:
        store.close()
    common.emit(rows, fmt, ["run", "name", "created", "features", "versions", "classifier", "target", "images",
                            "splits", "accuracy", "macro_f1", "model", "group", "labels"])
    versions = sorted({r["labels"] for r in rows})
    if len(versions) > 1:
        common.err(f"labels: the label version each run read (last change id); runs saw {len(versions)} different "
                   "versions, see `fs labels history`")


def _splits_cell(r: Any) -> str:
    from featurestore.training.evaluation import KFOLD_SCHEMES

    if r.split_scheme in KFOLD_SCHEMES:
        return f"{r.n_splits} folds"
    return f"{r.n_splits}x{r.test_size:g}"


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("compare")(compare)
    app.command("predict")(predict)
    # `fs runs` is a group of its own (cli/runs.py: the listing below, and `fs runs name`)
