"""Fit time of the Two-Flow model next to a plain Random Forest, in one run.

The Two-Flow model fits two selector forests (one per block) before its
200-tree forest, so it could be slower than a plain 200-tree forest on all
columns. It is kept cheaper by (a) selector forests of fewer trees than the
final one, (b) max_features="sqrt" in the selectors, and (c) the final forest
seeing 455 columns instead of 1408 (sqrt(455) = 21 candidate features per
split instead of 37). Target: Two-Flow fit time <= 1.5x the plain forest.

Single fits on this virtual machine move by 10-20 % between identical runs, so
``--repeats N`` fits each model N times in rounds (the order rotating each
round) and reports the ratio of the best times and the median of the per-round
ratios. ``--against-commit REV`` also fits the Two-Flow classifier as it was at
git revision REV, in the same rounds: a regression in our code shows up as a
difference between the two, whatever the machine's speed that day; the script
also says whether both fitted models predict the same labels. The CPU seconds of
each fit (all threads of the process) are reported beside the wall times: on a
loaded machine they are the steadier figure.

    python bench/bench_train.py --synthetic 5000
    python bench/bench_train.py --synthetic 5000 --selector-trees 50 --selector-max-samples 0.5
    python -m bench.bench_train --store .fs --repeats 6 --against-commit cca868b
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

try:
    from featurestore.training.twoflow import SELECTOR_TREES, TwoFlowClassifier
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from featurestore.training.twoflow import SELECTOR_TREES, TwoFlowClassifier

RP_DIM = 128
CNN_DIM = 1280
REPO = Path(__file__).resolve().parents[1]
# Where the Two-Flow classifier lived: training/twoflow.py since the restructure (issue 10).
TWO_FLOW_PATHS = ("featurestore/training/twoflow.py", "featurestore/training/model.py")


def two_flow_at(rev: str) -> Any:
    """The ``TwoFlowClassifier`` class as it was at git revision ``rev`` of this repository.

    The module's source is read with ``git show`` and executed as a module of its
    own (it imports only scikit-learn and ``featurestore.errors``).
    """
    for path in TWO_FLOW_PATHS:
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"bench_train: no Two-Flow module at {rev!r} in {REPO} ({shown.stderr.strip()})")
    name = f"_twoflow_at_{rev.replace('-', '_').replace('.', '_')}"
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:{path}"
    sys.modules[name] = module  # pickling and sklearn's clone look classes up by module
    try:
        exec(compile(shown.stdout, module.__file__, "exec"), module.__dict__)
        return module.TwoFlowClassifier
    except Exception as exc:  # an old module may import what this checkout no longer has
        raise SystemExit(
            f"bench_train: cannot load the Two-Flow classifier of {rev} ({type(exc).__name__}: {exc}); "
            "choose a later revision"
        ) from None


def synthetic(n: int, n_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """``n`` rows of RP-like + CNN-like columns with informative features in both blocks.

    Returns ``X`` (float32, ``n x (128 + 1280)``), ``y`` and the blocks mapping.
    """
    # One problem, informative columns spread over both blocks; the CNN block
    # carries most of the signal, as in the paper.
    n_inf, n_red = 72, 72
    X, y = make_classification(
        n_samples=n,
        n_features=RP_DIM + CNN_DIM,
        n_informative=n_inf,
        n_redundant=n_red,
        n_classes=n_classes,
        n_clusters_per_class=2,
        class_sep=2.0,
        flip_y=0.02,
        shuffle=False,
        random_state=seed,
    )
    # With shuffle=False the columns are [informative | redundant | noise].
    informative = np.arange(n_inf + n_red)
    noise = np.arange(n_inf + n_red, X.shape[1])
    rp_cols = np.concatenate([informative[:12], informative[n_inf : n_inf + 12], noise[: RP_DIM - 24]])
    cnn_cols = np.setdiff1d(np.arange(X.shape[1]), rp_cols)
    rng = np.random.RandomState(seed)
    rp = X[:, rng.permutation(rp_cols)]
    cnn = X[:, rng.permutation(cnn_cols)]
    X = np.hstack([rp, cnn]).astype(np.float32)
    blocks = {"rp128": (0, RP_DIM), "cnn": (RP_DIM, RP_DIM + CNN_DIM)}
    return X, y, blocks


class Fit(NamedTuple):
    """Seconds one fit took: wall time, and CPU time of every thread of the process."""

    wall: float
    cpu: float


def _timed_fit(estimator: Any, X: np.ndarray, y: np.ndarray) -> Fit:
    # The forests fit on joblib threads, so process CPU time counts their work; unlike wall time it
    # does not grow when other processes take the cores (per-round wall ratios at load 7-8: 0.89-5.14).
    start, cpu = time.perf_counter(), time.process_time()
    estimator.fit(X, y)
    return Fit(time.perf_counter() - start, time.process_time() - cpu)


def _summary(times: list[float], base: list[float]) -> dict[str, Any]:
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    return {
        "best_s": round(min(times), 3),
        "median_s": round(statistics.median(times), 3),
        "ratio": round(min(times) / min(base), 3),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
    }


def run(
    X: np.ndarray,
    y: np.ndarray,
    blocks: dict[str, tuple[int, int]],
    select: dict[str, Any] | None = None,
    trees: int = 200,
    selector_trees: int = SELECTOR_TREES,
    selector_max_features: Any = "sqrt",
    selector_max_samples: float | None = None,
    seed: int = 0,
    n_jobs: int = -1,
    repeats: int = 1,
    against: Any = None,
) -> dict[str, Any]:
    """Fit the models on a 90% split ``repeats`` times each, in rounds, and time them.

    ``against`` is another ``TwoFlowClassifier`` class (e.g. :func:`two_flow_at`),
    fitted with the same arguments in the same rounds. Returns a dict with the
    best and median fit seconds of each model, the ratio of the best times
    (Two-Flow / plain), the median and range of the per-round ratios, holdout
    accuracies and the kept-feature counts.
    """
    select = select if select is not None else {"rp128": 55, "cnn": 400}
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.1, random_state=seed, stratify=y)
    kwargs = {
        "blocks": blocks,
        "select": select,
        "trees": trees,
        "selector_trees": selector_trees,
        "selector_max_features": selector_max_features,
        "selector_max_samples": selector_max_samples,
        "random_state": seed,
        "n_jobs": n_jobs,
    }
    makers: dict[str, Any] = {
        "plain": lambda: RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=n_jobs),
        "two_flow": lambda: TwoFlowClassifier(**kwargs),
    }
    if against is not None:
        try:
            against(**kwargs)
        except TypeError as exc:
            raise SystemExit(
                f"bench_train: the Two-Flow classifier of that revision takes other arguments ({exc}); "
                "choose a later revision"
            ) from None
        makers["against"] = lambda: against(**kwargs)
    times: dict[str, list[float]] = {name: [] for name in makers}
    cpu: dict[str, list[float]] = {name: [] for name in makers}
    fitted: dict[str, Any] = {}
    order = list(makers)
    for round_ in range(repeats):
        # Rotate the order so no model always runs first (or right after the slowest).
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            fitted[name] = makers[name]()
            fit = _timed_fit(fitted[name], X_train, y_train)
            times[name].append(fit.wall)
            cpu[name].append(fit.cpu)
        print(
            f"round {round_ + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in order),
            file=sys.stderr,
            flush=True,
        )

    # Time of the selectors alone, to show where the Two-Flow time goes.
    two_flow = fitted["two_flow"]
    select_step = two_flow.pipeline_.named_steps["select"]
    selector_seconds = 0.0
    for _name, step, cols in select_step.transformers:
        if step != "passthrough":
            selector_seconds += _timed_fit(step.estimator, X_train[:, cols], y_train).wall

    ours = _summary(times["two_flow"], times["plain"])
    figures: dict[str, Any] = {
        "n_train": int(X_train.shape[0]),
        "n_features": int(X.shape[1]),
        "n_classes": int(np.unique(y).size),
        "trees": trees,
        "selector_trees": selector_trees,
        "selector_max_features": selector_max_features,
        "selector_max_samples": selector_max_samples,
        "repeats": repeats,
        "plain_rf_fit_s": round(min(times["plain"]), 3),
        "plain_rf_median_s": round(statistics.median(times["plain"]), 3),
        "two_flow_fit_s": ours["best_s"],
        "two_flow_median_s": ours["median_s"],
        "two_flow_selectors_s": round(selector_seconds, 3),
        "ratio": ours["ratio"],
        "ratio_median": ours["ratio_median"],
        "ratio_range": ours["ratio_range"],
        "cpu": {name: _summary(cpu[name], cpu["plain"]) for name in makers},
        "plain_rf_accuracy": round(float(fitted["plain"].score(X_test, y_test)), 4),
        "two_flow_accuracy": round(float(two_flow.score(X_test, y_test)), 4),
        "kept": {k: int(v.size) for k, v in two_flow.kept_features_.items()},
    }
    if against is not None:
        theirs = _summary(times["against"], times["plain"])
        paired = _summary(times["two_flow"], times["against"])  # ours / theirs, round by round
        paired_cpu = _summary(cpu["two_flow"], cpu["against"])
        figures["against"] = {
            **theirs,
            "ours_to_theirs_median": paired["ratio_median"],
            "ours_to_theirs_range": paired["ratio_range"],
            "ours_to_theirs_cpu_median": paired_cpu["ratio_median"],
            "ours_to_theirs_cpu_range": paired_cpu["ratio_range"],
            "same_predictions": bool(np.array_equal(fitted["against"].predict(X_test), two_flow.predict(X_test))),
            "same_kept": all(
                np.array_equal(fitted["against"].kept_features_[k], v) for k, v in two_flow.kept_features_.items()
            ),
        }
    return figures


def _report(figures: dict[str, Any], rev: str | None) -> None:
    print(f"data: {figures['n_train']} training rows x {figures['n_features']} columns, {figures['n_classes']} classes")
    print(
        f"plain RF ({figures['trees']} trees, all columns): fit {figures['plain_rf_fit_s']:.2f} s, "
        f"holdout accuracy {figures['plain_rf_accuracy']:.3f}"
    )
    print(
        f"Two-Flow (selectors {figures['selector_trees']} trees, max_features "
        f"{figures['selector_max_features']}, max_samples {figures['selector_max_samples']}; "
        f"kept {figures['kept']}): fit {figures['two_flow_fit_s']:.2f} s "
        f"(selectors alone {figures['two_flow_selectors_s']:.2f} s), "
        f"holdout accuracy {figures['two_flow_accuracy']:.3f}"
    )
    print(
        f"ratio Two-Flow / plain RF: {figures['ratio']:.2f}x of the best times (target <= 1.5x); "
        f"per round median {figures['ratio_median']:.2f}x, range {figures['ratio_range'][0]:.2f}-"
        f"{figures['ratio_range'][1]:.2f} over {figures['repeats']} rounds"
    )
    c = figures["cpu"]
    print(
        f"CPU seconds (all threads), best: plain RF {c['plain']['best_s']:.2f}, "
        f"Two-Flow {c['two_flow']['best_s']:.2f}; "
        f"ratio {c['two_flow']['ratio']:.2f}x of the best, per round median {c['two_flow']['ratio_median']:.2f}x, "
        f"range {c['two_flow']['ratio_range'][0]:.2f}-{c['two_flow']['ratio_range'][1]:.2f}"
        + (f"; at {rev}: {c['against']['best_s']:.2f}, ratio {c['against']['ratio']:.2f}x" if "against" in c else "")
    )
    if "against" in figures:
        a = figures["against"]
        print(
            f"Two-Flow at {rev}: fit {a['best_s']:.2f} s (median {a['median_s']:.2f}); ratio to "
            f"plain RF {a['ratio']:.2f}x of the best times, per round median {a['ratio_median']:.2f}x, range "
            f"{a['ratio_range'][0]:.2f}-{a['ratio_range'][1]:.2f}; same holdout predictions as ours: "
            f"{a['same_predictions']}, same kept features: {a['same_kept']}"
        )
        print(
            f"ours / {rev}, round by round: median {a['ours_to_theirs_median']:.3f}x, range "
            f"{a['ours_to_theirs_range'][0]:.2f}-{a['ours_to_theirs_range'][1]:.2f}; CPU median "
            f"{a['ours_to_theirs_cpu_median']:.3f}x, range {a['ours_to_theirs_cpu_range'][0]:.2f}-"
            f"{a['ours_to_theirs_cpu_range'][1]:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="generate N synthetic rows (128 RP + 1280 CNN columns)",
    )
    source.add_argument(
        "--store",
        metavar="PATH",
        help="read real features from a store (e.g. 5,000 Fashion-MNIST images after "
        "`fs extract --rp 128 --model efficientnet-lite0`)",
    )
    parser.add_argument("--features", default="rp128,efficientnet-lite0", help="with --store: the two flows")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--selector-trees", type=int, default=SELECTOR_TREES)
    parser.add_argument("--selector-max-features", default="sqrt", help='"sqrt", "log2", an int or a float fraction')
    parser.add_argument("--selector-max-samples", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="fits per model, in rounds; best and median are kept")
    parser.add_argument(
        "--against-commit",
        metavar="REV",
        help="also time the Two-Flow classifier of git revision REV in the same rounds (e.g. cca868b, before the "
        "restructure)",
    )
    parser.add_argument("--n-jobs", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    mf: Any = args.selector_max_features
    if mf not in ("sqrt", "log2"):
        mf = float(mf) if "." in mf else int(mf)
    select = None
    if args.store:
        from featurestore.config import Settings
        from featurestore.store import Store

        left, right = args.features.split(",")
        store = Store.open(Settings.from_env(store=args.store))
        t = time.perf_counter()
        fm = store.read_matrix([left, right], labelled_only=True)
        print(f"assembled {fm.X.shape[0]} x {fm.X.shape[1]} from {args.store} in {time.perf_counter() - t:.2f} s")
        X, y, blocks = fm.X, fm.labels.astype(str), fm.blocks
        select = {left: 55, right: 400}
    else:
        X, y, blocks = synthetic(args.synthetic, n_classes=args.classes, seed=args.seed)
    figures = run(
        X,
        y,
        blocks,
        select=select,
        trees=args.trees,
        selector_trees=args.selector_trees,
        selector_max_features=mf,
        selector_max_samples=args.selector_max_samples,
        seed=args.seed,
        n_jobs=args.n_jobs,
        repeats=args.repeats,
        against=two_flow_at(args.against_commit) if args.against_commit else None,
    )
    if args.json:
        print(json.dumps(figures))
    else:
        _report(figures, args.against_commit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
