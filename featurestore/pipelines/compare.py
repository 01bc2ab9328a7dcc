"""Comparing two training runs (``fs compare A B``, ``/ui/compare``): a paired test of their test accuracy.

Two runs evaluated on the same repeated splits are paired split by split (a
two-sided t-test); two runs scored on the same fixed test dataset are paired
image by image (McNemar's exact test). Runs that cannot be paired are refused
with the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

from featurestore.catalog.schema import Run
from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.store import Store
from featurestore.training.evaluation import KFOLD_SCHEMES
from featurestore.training.stats import McNemarTest, PairedTTest, mcnemar, paired_ttest


@dataclass
class Comparison:
    run_a: Run
    run_b: Run
    test: PairedTTest | McNemarTest
    labels_note: str | None = None
    """Set when the two runs read different label versions (labels were changed between them)."""


def labels_note(ra: Run, rb: Run) -> str | None:
    """A sentence when two runs saw different labels (``fs labels`` changes between them), else None."""
    # A run recorded before label history existed saw the labels before any change: version 0.
    va, vb = ra.label_version or 0, rb.label_version or 0
    if va == vb:
        return None
    return (f"labels were changed between runs {ra.id} and {rb.id} (label versions {va} and {vb}: changes "
            f"{min(va, vb) + 1}..{max(va, vb)}, see `fs labels history`)")


def compare(store: Store, a: int, b: int, confidence: float = 0.95) -> Comparison:
    """Compare two runs' test accuracy (A - B), paired: a two-sided t-test over the same random splits, or,
    for two runs scored on the same fixed test dataset, McNemar's exact test image by image."""
    ra, rb = store.catalog.run(a), store.catalog.run(b)
    if a == b:
        raise InvalidInputError("compare needs two different runs")
    fixed = [r.split_scheme == "fixed-test" for r in (ra, rb)]
    if all(fixed):
        return Comparison(ra, rb, _compare_fixed(store, ra, rb, confidence), labels_note(ra, rb))
    if any(fixed):
        one, other = (ra, rb) if fixed[0] else (rb, ra)
        raise FeatureStoreError(
            f"run {one.id} was scored on the fixed test dataset {one.test_dataset} and run {other.id} on repeated "
            "random splits, so no paired test applies; compare it with another run on the same test dataset",
            remedy="evaluate-test-dataset")
    reasons = []
    if ra.n_images != rb.n_images:
        reasons.append(f"run {a} used {ra.n_images} images, run {b} {rb.n_images}")
    kfold = [r.split_scheme in KFOLD_SCHEMES for r in (ra, rb)]
    if kfold[0] != kfold[1]:
        one = ra if kfold[0] else rb
        reasons.append(f"run {one.id} was evaluated on {one.n_splits} folds, the other on repeated random splits")
    for attr in ("seed", "n_splits", "test_size", "target"):
        if getattr(ra, attr) != getattr(rb, attr):
            reasons.append(f"{attr}: {getattr(ra, attr)} vs {getattr(rb, attr)}")
    if ra.splits_fingerprint != rb.splits_fingerprint and not reasons:
        note = labels_note(ra, rb)
        if note and ra.split_scheme in ("stratified", *KFOLD_SCHEMES):
            reasons.append(f"{note}, and stratified splits follow the labels")
        else:
            reasons.append("the splits contain different images (the image sets differ)")
    if reasons:
        raise FeatureStoreError(
            f"runs {a} and {b} were not evaluated on the same splits ({'; '.join(reasons)}), so a paired test "
            "does not apply", remedy="evaluate-both", reasons=reasons)
    return Comparison(ra, rb, paired_ttest(store.catalog.split_scores(a), store.catalog.split_scores(b), confidence),
                      labels_note(ra, rb))


def _compare_fixed(store: Store, ra: Run, rb: Run, confidence: float) -> McNemarTest:
    """McNemar's test of two fixed-test runs on the test images both predicted."""
    reasons = [f"{attr}: {getattr(ra, attr)} vs {getattr(rb, attr)}"
               for attr in ("test_dataset", "target") if getattr(ra, attr) != getattr(rb, attr)]
    if reasons:
        raise FeatureStoreError(f"runs {ra.id} and {rb.id} were not scored on the same test images "
                                f"({'; '.join(reasons)}), so a paired test does not apply")
    got = {r.id: store.catalog.test_correctness(r.id) for r in (ra, rb)}
    missing = [i for i, rows in got.items() if not rows]
    if missing:
        raise FeatureStoreError(
            f"run {missing[0]} was recorded before featurestore kept the per-image predictions of fixed-test runs, "
            "so McNemar's test cannot pair it; evaluate it again", remedy="evaluate-again", run_id=missing[0])
    a_rows, b_rows = got[ra.id], got[rb.id]
    if a_rows.keys() != b_rows.keys():
        raise FeatureStoreError(
            f"runs {ra.id} and {rb.id} were scored on different images of the test dataset {ra.test_dataset} "
            f"({len(a_rows)} and {len(b_rows)}, {len(a_rows.keys() & b_rows.keys())} in common; it changed "
            "between them, or they selected different images), so a paired test does not apply"
        )
    ids = sorted(a_rows)
    return mcnemar([a_rows[i] for i in ids], [b_rows[i] for i in ids], confidence)
