"""Label mistakes on Fashion-MNIST: in-sample `fs report --mistakes` vs `fs audit labels` from K folds.

Fashion-MNIST train images (class-balanced sample, default 10,000) and the
official test images (default 10,000) are exported, ingested and featurized
once (efficientnet-lite0's global pool and its block14/block10 taps, cached
under FS_BENCH_DIR). Each run then works on a copy of that store:

1. the official test accuracy with the clean labels (train on train, score on test);
2. labels of the train images flipped (seeded): a share to the look-alike class
   (the class whose mean efficientnet-lite0 vector is nearest) and a share to a
   uniformly drawn other class, written with `fs labels import`; the official
   test accuracy with these noisy labels;
3. `fs train --folds K` on the noisy labels: K fold models (out-of-fold
   probabilities and neighbour votes kept) plus the final model, which predicts
   the train images in-sample for the `fs report --mistakes` ranking (the baseline);
4. `fs audit labels` on the stored values (no model fitted): with its defaults
   (the fold models' probabilities averaged with the neighbour votes) and with
   `--neighbour-weight 0` (the models' alone); cleanlab called directly on the
   same probabilities (must agree);
5. AUROC of the rankings against the true flips, precision / recall of the
   flagged sets, cleanlab's estimate vs the true number of flips;
6. every flagged image relabelled to its suggestion (`fs labels set`), then the
   official test accuracy after the fix; the same for the models'-only flags
   (labels set back to the noisy ones first).

Steps 2-6 run once per noise seed (`--seeds`, default 0 to 9; about 2.5 minutes
each on 2 cores): the recovered share of one seed swings from about 55 % to 85 %
with which right labels the fix happens to change, so the mean over the seeds is
what the target is judged on.

Defaults: classifier logreg-strong on every column (--select none), `fs audit labels --filter-by both`.

Run: python bench/bench_label_issues.py [--n-train 10000] [--n-test 10000] [--folds 5] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

BENCH_DIR = Path(os.environ.get("FS_BENCH_DIR", "/tmp/featurestore-bench"))
FEATURES = ("efficientnet-lite0", "efficientnet-lite0.block14_out", "efficientnet-lite0.block10_out")


def _fs(store: Path, *args: str) -> None:
    """Run an `fs` command on ``store`` (preparation steps; they skip what is already done)."""
    exe = Path(sys.executable).with_name("fs")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FS_")}, "FS_STORE": str(store)}
    subprocess.run([str(exe), *args], check=True, env=env, cwd=store.parent, stdout=subprocess.DEVNULL)


def prepare(n_train: int, n_test: int) -> Path:
    """The cached store with both splits ingested and featurized; returns its folder."""
    root = BENCH_DIR / f"label-issues-{n_train}-{n_test}"
    store = root / ".fs"
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if (store / "catalog.db").exists():
        _fs(store, "db", "upgrade")  # a cache made by an older featurestore
    _fs(store, "datasets", "export", "fashion-mnist", str(root / "train"), "--split", "train", "--limit", str(n_train))
    _fs(store, "datasets", "export", "fashion-mnist", str(root / "test"), "--split", "test", "--limit", str(n_test))
    _fs(store, "ingest", str(root / "train"), "--dataset", "train")
    _fs(store, "ingest", str(root / "test"), "--dataset", "test")
    _fs(store, "extract", "--model", "efficientnet-lite0", "--layers", "global_pool,block14_out,block10_out")
    print(f"prepared {root} ({time.perf_counter() - t:.0f} s; cached for the next run)", file=sys.stderr)
    return store


def auroc(is_flip: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_flip, score))


def precision_recall(is_flip: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    hits = int((is_flip & flagged).sum())
    return hits / max(int(flagged.sum()), 1), hits / max(int(is_flip.sum()), 1)


def look_alikes(X: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, str]:
    """Each class -> the class whose mean (L2-normalised) vector is nearest."""
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    means = np.stack([Xn[y == c].mean(axis=0) for c in classes])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    sim = means @ means.T
    np.fill_diagonal(sim, -np.inf)
    return {c: classes[int(np.argmax(sim[i]))] for i, c in enumerate(classes)}


def flip_labels(y: np.ndarray, classes: list[str], alike: dict[str, str], share_alike: float, share_uniform: float,
                seed: int) -> np.ndarray:
    """Noisy copy of ``y``: disjoint seeded shares flipped to the look-alike class and to a uniform other class."""
    rng = np.random.default_rng(seed)
    n = len(y)
    order = rng.permutation(n)
    k_alike, k_uniform = round(share_alike * n), round(share_uniform * n)
    noisy = y.copy()
    for i in order[:k_alike]:
        noisy[i] = alike[y[i]]
    for i in order[k_alike:k_alike + k_uniform]:
        others = [c for c in classes if c != y[i]]
        noisy[i] = others[int(rng.integers(len(others)))]
    return noisy


@dataclass
class Audit:
    """What the K-fold run, `fs audit labels` and cleanlab called directly found, per train image."""

    run_id: int
    quality: np.ndarray
    flagged: np.ndarray
    estimated: int
    agrees: bool
    fits_kfold: int
    fits_audit: int
    fits_direct: int
    seconds: float
    suggestions: dict[str, list[int]]
    alone_quality: np.ndarray
    """The same with `--neighbour-weight 0` (the fold models' probabilities alone)."""
    alone_flagged: np.ndarray
    alone_estimated: int
    alone_suggestions: dict[str, list[int]]


def _counting_fits() -> tuple[Any, dict[str, int]]:
    from featurestore.training.twoflow import TwoFlowClassifier

    fits = {"n": 0}
    real_fit = TwoFlowClassifier.fit

    def counted_fit(self: Any, *a: Any, **kw: Any) -> Any:
        fits["n"] += 1
        return real_fit(self, *a, **kw)

    return mock.patch.object(TwoFlowClassifier, "fit", counted_fit), fits


def kfold_audit(store: Any, feats: list[str], ids: np.ndarray, classifier: str, select: str | None, folds: int,
                seed: int, dataset: str, filter_by: str, min_confidence: float) -> Audit:
    """`fs train --folds K` (final model kept for the baseline), `fs audit labels`, cleanlab directly."""
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from featurestore.pipelines.labels import audit_labels
    from featurestore.pipelines.train import TrainConfig, train
    from featurestore.training.label_issues import DEFAULT_NEIGHBOUR_WEIGHT

    patch, fits = _counting_fits()
    t = time.perf_counter()
    with patch:
        with store.writing(sweep=False):
            run_id = train(store, TrainConfig(feats, select=select, classifier=classifier, dataset=dataset,
                                              folds=folds, seed=seed), fit_final=True).run_id
        fits_kfold = fits["n"]
        fits["n"] = 0
        audit = audit_labels(store, run_id, filter_by, min_confidence)
        alone = audit_labels(store, run_id, filter_by, min_confidence, neighbour_weight=0.0)
        fits_audit = fits["n"]
        oof = store.catalog.run_oof(run_id)
        assert oof is not None and oof.neighbours is not None
        w = DEFAULT_NEIGHBOUR_WEIGHT  # the blend, written out here rather than imported
        judged = (1 - w) * oof.probabilities + w * oof.neighbours
        given = np.asarray([oof.classes.index(lb) for lb in oof.labels])
        direct_flagged = np.asarray(find_label_issues(given, judged, filter_by=filter_by, n_jobs=1), dtype=bool)
        others = judged.copy()
        others[np.arange(len(given)), given] = -np.inf
        direct_flagged &= others.max(axis=1) >= min_confidence  # the --min-confidence rule
        direct_quality = get_label_quality_scores(given, judged)
        direct_estimate = int(num_label_issues(given, judged))
        fits_direct = fits["n"] - fits_audit

    def per_image(a: Any) -> tuple[np.ndarray, np.ndarray, dict[str, list[int]]]:
        by_id = {r.image_id: r for r in a.rows}
        suggestions: dict[str, list[int]] = {}
        for r in a.rows:
            if r.flagged:
                suggestions.setdefault(r.suggested, []).append(r.image_id)
        return (np.array([by_id[int(i)].quality for i in ids]), np.array([by_id[int(i)].flagged for i in ids]),
                suggestions)

    quality, flagged, suggestions = per_image(audit)
    alone_quality, alone_flagged, alone_suggestions = per_image(alone)
    pos = {int(i): k for k, i in enumerate(ids)}
    oof_pos = np.array([pos[int(i)] for i in oof.image_ids])
    agrees = (np.array_equal(flagged[oof_pos], direct_flagged) and bool(np.allclose(quality[oof_pos], direct_quality))
              and audit.estimated_issues == direct_estimate)
    return Audit(run_id, quality, flagged, audit.estimated_issues, agrees, fits_kfold, fits_audit, fits_direct,
                 time.perf_counter() - t, suggestions, alone_quality, alone_flagged, alone.estimated_issues,
                 alone_suggestions)


def in_sample_ranking(store: Any, run_id: int, ids: np.ndarray) -> np.ndarray:
    """The `fs report --mistakes` ranking as a score per image: the final model predicts the train images
    (in-sample); its wrong predictions come first, most confident first (score = probability > 0), then the
    right ones, least confident first (score = -probability)."""
    from featurestore.pipelines.predict import predict

    with store.writing(sweep=False):
        predict(store, run_id, ids.tolist())
    catalog = store.catalog
    pos = {int(i): k for k, i in enumerate(ids)}
    stored = catalog.run_predictions_of(run_id, ids.tolist())
    score = -np.array([stored[int(i)].probability for i in ids])
    for wrong in catalog.confident_mistakes(catalog.run_facts(run_id), limit=len(ids)):
        score[pos[wrong.image_id]] = wrong.probability
    return score


def sample_dataset(store: Any, n: int, seed: int) -> None:
    """Dataset "sample": a seeded class-balanced ``n`` of the train images (a smaller run on the cached store)."""
    from featurestore.catalog.schema import utcnow

    rows = list(store.select_images(image_ids=sorted(store.catalog.dataset_image_ids("train"))))
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[Any]] = {}
    for r in rows:
        by_class.setdefault(r.label, []).append(r)
    per = n // len(by_class)
    chosen = [r for c in sorted(by_class) for r in rng.permutation(np.array(by_class[c], dtype=object))[:per]]
    with store.writing(sweep=False), store.catalog.session() as s:
        ds = store.catalog.dataset_id(s, "sample", create=True)
        store.catalog.add_members(s, ds, [(int(r[0]), str(r[1])) for r in chosen], utcnow())


def write_noise(store: Any, csv_path: Path, ids: np.ndarray, noisy: np.ndarray, is_flip: np.ndarray) -> None:
    """The flipped labels, written as `fs labels import` does (one transaction, history rows)."""
    from featurestore.pipelines.labels import import_labels

    csv_path.write_text("".join(f"{i},{lb},bench noise\n" for i, lb, flip in zip(ids, noisy, is_flip, strict=True)
                                if flip), encoding="utf-8")
    with store.writing(sweep=False):
        assert len(import_labels(store, csv_path)[0]) == int(is_flip.sum())


def accept(store: Any, suggestions: dict[str, list[int]], reason: str) -> None:
    """Relabel each flagged image to its suggestion (`fs labels set`, one call per label)."""
    from featurestore.pipelines.labels import set_labels

    with store.writing(sweep=False):
        for label, chosen in suggestions.items():
            set_labels(store, chosen, label, reason=reason)


def back_to_noisy(store: Any, ids: np.ndarray, fixed: dict[int, str | None], noisy: np.ndarray) -> None:
    """Set the labels a fix changed back to the noisy ones (before accepting another audit's flags)."""
    back: dict[str, list[int]] = {}
    for k, i in enumerate(ids):
        if fixed[int(i)] != noisy[k]:
            back.setdefault(str(noisy[k]), []).append(int(i))
    accept(store, back, "bench: back to the noisy labels")


def run(n_train: int, n_test: int, folds: int, classifier: str, share_alike: float, share_uniform: float,
        seed: int, sample: int | None = None, select: str | None = "none", filter_by: str = "both",
        min_confidence: float = 0.0) -> dict[str, Any]:
    from featurestore import connect
    from featurestore.pipelines.train import TrainConfig, train

    cached = prepare(n_train, n_test)
    work = Path(tempfile.mkdtemp(prefix="fs-label-issues-"))
    feats = list(FEATURES)
    try:
        shutil.copytree(cached, work / ".fs", ignore=shutil.ignore_patterns("write.lock"))
        store = connect(work / ".fs")
        if sample:
            sample_dataset(store, sample, seed)
        train_set = "sample" if sample else "train"
        train_ids = sorted(store.catalog.dataset_image_ids(train_set))
        fm = store.read_matrix(feats, image_ids=train_ids, labelled_only=True)
        truth = np.asarray(fm.labels, dtype=object).astype(str)
        classes = sorted(set(truth.tolist()))
        ids = np.asarray(fm.image_ids, dtype=np.int64)
        print(f"{len(ids)} train images, {len(store.catalog.dataset_image_ids('test'))} test images, "
              f"{fm.X.shape[1]} feature columns ({', '.join(feats)})", file=sys.stderr)

        def fixed_test(what: str) -> float:
            t = time.perf_counter()
            cfg = TrainConfig(feats, select=select, classifier=classifier, dataset=train_set, test_dataset="test",
                              seed=seed)
            with store.writing(sweep=False):
                acc = float(train(store, cfg, fit_final=False).evaluation.splits[0].accuracy)
            print(f"{what}: official test accuracy {acc:.4f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
            return acc

        acc_clean = fixed_test("clean labels")
        alike = look_alikes(fm.X[:, slice(*fm.blocks[FEATURES[0]])], truth, classes)
        noisy = flip_labels(truth, classes, alike, share_alike, share_uniform, seed)
        is_flip = noisy != truth
        write_noise(store, work / "noise.csv", ids, noisy, is_flip)
        acc_noisy = fixed_test("noisy labels")
        audit = kfold_audit(store, feats, ids, classifier, select, folds, seed, train_set, filter_by, min_confidence)
        print(f"{folds}-fold run + audit: {audit.seconds:.0f} s", file=sys.stderr)
        in_sample = in_sample_ranking(store, audit.run_id, ids)
        accept(store, audit.suggestions, f"bench: audit of run {audit.run_id}")  # every flagged suggestion
        fixed = {int(r.id): r.label for r in store.select_images(image_ids=ids.tolist())}
        right_after = np.array([fixed[int(i)] == truth[k] for k, i in enumerate(ids)])
        acc_fixed = fixed_test("after the fix")
        back_to_noisy(store, ids, fixed, noisy)
        accept(store, audit.alone_suggestions, f"bench: models'-only audit of run {audit.run_id}")
        acc_alone = fixed_test("after the fix, models'-only flags")
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (p_in, r_in), (p_oof, r_oof), (p_alone, r_alone) = (precision_recall(is_flip, in_sample > 0),
                                                        precision_recall(is_flip, audit.flagged),
                                                        precision_recall(is_flip, audit.alone_flagged))
    lost = acc_clean - acc_noisy
    return {
        "seed": seed, "n_train": int(len(ids)), "n_test": n_test, "folds": folds, "classifier": classifier,
        "select": select or "default", "filter_by": filter_by, "min_confidence": min_confidence,
        "features": feats, "look_alike": alike, "true_flips": int(is_flip.sum()),
        "flips_look_alike": round(share_alike * len(ids)), "flips_uniform": round(share_uniform * len(ids)),
        "auroc_in_sample": auroc(is_flip, in_sample), "auroc_oof": auroc(is_flip, -audit.quality),
        "in_sample_flagged": int((in_sample > 0).sum()), "in_sample_precision": p_in, "in_sample_recall": r_in,
        "oof_flagged": int(audit.flagged.sum()), "oof_precision": p_oof, "oof_recall": r_oof,
        "auroc_models_alone": auroc(is_flip, -audit.alone_quality),
        "models_alone_flagged": int(audit.alone_flagged.sum()), "models_alone_precision": p_alone,
        "models_alone_recall": r_alone, "models_alone_estimated": audit.alone_estimated,
        "accuracy_fixed_models_alone": acc_alone,
        "recovered_models_alone": (acc_alone - acc_noisy) / lost if lost > 0 else float("nan"),
        "estimated_issues": audit.estimated, "cleanlab_direct_agrees": audit.agrees,
        "fits_kfold_run": audit.fits_kfold, "fits_audit": audit.fits_audit, "fits_cleanlab_direct": audit.fits_direct,
        "labels_right_noisy": float((~is_flip).mean()), "labels_right_after_fix": float(right_after.mean()),
        "accuracy_clean": acc_clean, "accuracy_noisy": acc_noisy, "accuracy_fixed": acc_fixed,
        "recovered": (acc_fixed - acc_noisy) / lost if lost > 0 else float("nan"),
    }


def report(f: dict[str, Any]) -> None:
    """One seed's figures."""
    print(f"noise seed {f['seed']}: {f['n_train']} Fashion-MNIST train images, {f['true_flips']} labels flipped "
          f"({f['flips_look_alike']} to the look-alike class, {f['flips_uniform']} uniformly); "
          f"{f['classifier']} (--select {f['select']}) on {' + '.join(f['features'])}; {f['folds']} folds; "
          f"fs audit labels --filter-by {f['filter_by']} --min-confidence {f['min_confidence']:g}")
    print(f"  {'ranking':<52} {'AUROC':>6} {'flagged':>8} {'precision':>9} {'recall':>6} {'recovered':>9}")
    print(f"  {'in-sample: fs report --mistakes (baseline)':<52} {f['auroc_in_sample']:6.3f} "
          f"{f['in_sample_flagged']:8d} {f['in_sample_precision']:9.3f} {f['in_sample_recall']:6.3f}")
    print(f"  {'out-of-fold, models alone (--neighbour-weight 0)':<52} {f['auroc_models_alone']:6.3f} "
          f"{f['models_alone_flagged']:8d} {f['models_alone_precision']:9.3f} {f['models_alone_recall']:6.3f} "
          f"{100 * f['recovered_models_alone']:8.0f}%")
    print(f"  {'out-of-fold: fs audit labels (models + neighbours)':<52} {f['auroc_oof']:6.3f} "
          f"{f['oof_flagged']:8d} {f['oof_precision']:9.3f} {f['oof_recall']:6.3f} {100 * f['recovered']:8.0f}%")
    print(f"  cleanlab called directly on the same probabilities agrees: {f['cleanlab_direct_agrees']}")
    print(f"  wrong labels: estimated {f['estimated_issues']}, true {f['true_flips']}")
    print(f"  model fits: {f['fits_kfold_run']} for the K-fold run ({f['folds']} folds + the final model that the "
          f"baseline needs), {f['fits_audit']} by fs audit labels, {f['fits_cleanlab_direct']} by cleanlab")
    print(f"  labels right: {100 * f['labels_right_noisy']:.1f}% noisy, {100 * f['labels_right_after_fix']:.1f}% "
          f"after accepting every flagged suggestion")
    print(f"  official test accuracy ({f['n_test']} images): clean {100 * f['accuracy_clean']:.2f}, noisy "
          f"{100 * f['accuracy_noisy']:.2f}, fixed {100 * f['accuracy_fixed']:.2f} (models' flags alone "
          f"{100 * f['accuracy_fixed_models_alone']:.2f}); {100 * f['recovered']:.0f}% of the accuracy lost to "
          f"the noise recovered")


MEANS = ("auroc_in_sample", "auroc_models_alone", "auroc_oof", "models_alone_precision", "models_alone_recall",
         "oof_precision", "oof_recall", "accuracy_clean", "accuracy_noisy", "accuracy_fixed",
         "accuracy_fixed_models_alone", "recovered_models_alone", "recovered")
"""Figures averaged over the noise seeds."""


def summary(per_seed: list[dict[str, Any]]) -> dict[str, float]:
    return {k: float(np.mean([f[k] for f in per_seed])) for k in MEANS}


def report_mean(m: dict[str, float], n: int) -> None:
    print(f"mean of {n} noise seed(s): AUROC {m['auroc_oof']:.3f} (models alone {m['auroc_models_alone']:.3f}, "
          f"in-sample {m['auroc_in_sample']:.3f}); flagged precision {m['oof_precision']:.3f} at recall "
          f"{m['oof_recall']:.3f} (models alone {m['models_alone_precision']:.3f} / {m['models_alone_recall']:.3f}); "
          f"official test accuracy clean {100 * m['accuracy_clean']:.2f}, noisy {100 * m['accuracy_noisy']:.2f}, "
          f"fixed {100 * m['accuracy_fixed']:.2f}: {100 * m['recovered']:.0f}% recovered (models' flags alone "
          f"{100 * m['recovered_models_alone']:.0f}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--classifier", default="logreg-strong")
    parser.add_argument("--select", default="none", help="fs train --select (default none: every column)")
    parser.add_argument("--filter-by", default="both", help="fs audit labels --filter-by")
    parser.add_argument("--min-confidence", type=float, default=0.0, help="fs audit labels --min-confidence")
    parser.add_argument("--look-alike", type=float, default=0.05, help="share flipped to the look-alike class")
    parser.add_argument("--uniform", type=float, default=0.05, help="share flipped to a uniform other class")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9",
                        help="noise seeds, comma-separated (each also seeds the folds)")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="use a seeded class-balanced N of the --n-train images (a shorter run on the same cache)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.folds < 2 or args.n_train < 10 * args.folds or args.n_test < 1:
        parser.error("need --folds >= 2, --n-train >= 10 x folds and --n-test >= 1")
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        print("skipped: cleanlab is not installed (pip install 'cleanlab==2.9.*')")
        return 0
    from featurestore.io.fashion_mnist import FASHION_MNIST_DIR

    if not any(FASHION_MNIST_DIR.glob("*-ubyte.gz")):
        print(f"skipped: Fashion-MNIST is not installed at {FASHION_MNIST_DIR} (apt install dataset-fashion-mnist)")
        return 0
    if args.sample is not None and not 10 * args.folds <= args.sample <= args.n_train:
        parser.error("--sample must be between 10 x folds and --n-train")
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {args.seeds!r}")
    per_seed = []
    for seed in seeds:
        figures = run(args.n_train, args.n_test, args.folds, args.classifier, args.look_alike, args.uniform, seed,
                      args.sample, args.select or None, args.filter_by, args.min_confidence)
        per_seed.append(figures)
        if not args.json:
            report(figures)
    mean = summary(per_seed)
    if args.json:
        print(json.dumps({"seeds": per_seed, "mean": mean}, indent=2))
    else:
        report_mean(mean, len(seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
