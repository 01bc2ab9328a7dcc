"""Paired comparison of two models: over the same splits, or image by image on one fixed test set."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import stats

from featurestore.errors import InvalidInputError

# Differences whose spread is below this (relative to their size) are treated
# as identical: accuracies are fractions k / n_test, and a - b computed in
# floating point can differ in the last bits between splits, which would give
# scipy a near-zero variance and an absurd t statistic.
_ZERO_SPREAD_RTOL = 1e-12


@dataclass(frozen=True)
class PairedTTest:
    """Two-sided paired t-test of ``a`` against ``b``.

    Attributes
    ----------
    statistic : float
        t statistic of the differences ``a - b``; ``+inf``/``-inf`` when the
        differences are all equal and non-zero, ``0.0`` when they are all zero.
    pvalue : float
        Two-sided p-value; ``0.0`` and ``1.0`` in the two cases above.
    mean_diff : float
        Mean of ``a - b`` (positive: ``a`` scores higher).
    ci_low, ci_high : float
        t-based confidence interval of the mean difference (both equal to
        ``mean_diff`` when the differences are all equal).
    n : int
        Number of pairs.
    df : int
        Degrees of freedom, ``n - 1``.
    confidence : float
        Level of the interval.
    zero_variance : bool
        The differences are all equal (the degenerate case above).
    """

    kind: ClassVar[str] = "paired-t"

    statistic: float
    pvalue: float
    mean_diff: float
    ci_low: float
    ci_high: float
    n: int
    df: int
    confidence: float = 0.95
    zero_variance: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; an infinite statistic becomes ``"inf"``/``"-inf"``."""
        out = asdict(self)
        if math.isinf(self.statistic):
            out["statistic"] = "inf" if self.statistic > 0 else "-inf"
        return out


def paired_ttest(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedTTest:
    """Two-sided paired t-test of per-split scores ``a`` against ``b``.

    Uses :func:`scipy.stats.ttest_rel` for the statistic and p-value and the
    t distribution with ``n - 1`` degrees of freedom for the confidence
    interval of the mean difference ``a - b``.

    When every difference is the same (zero variance) scipy would return NaN
    (all differences zero) or an infinite statistic; instead this returns, so
    that a record never holds NaN:

    * all differences zero: ``statistic=0.0``, ``pvalue=1.0``;
    * all differences equal to ``d != 0``: ``statistic=±inf``, ``pvalue=0.0``;

    and in both cases ``ci_low == ci_high == mean_diff`` and
    ``zero_variance=True``.

    Parameters
    ----------
    a, b : sequence of float
        Scores of the two models on the same splits, in the same order.
    confidence : float
        Level of the interval, ``0 < confidence < 1``.

    Returns
    -------
    PairedTTest

    Raises
    ------
    InvalidInputError
        Lengths differ, fewer than 2 pairs, non-finite scores, or a bad
        ``confidence``.
    """
    x = np.asarray(a, dtype=float)
    z = np.asarray(b, dtype=float)
    if x.ndim != 1 or z.ndim != 1:
        raise InvalidInputError("paired t-test needs two flat sequences of scores")
    if x.size != z.size:
        raise InvalidInputError(f"paired t-test needs the same splits for both runs: got {x.size} and {z.size} scores")
    if x.size < 2:
        raise InvalidInputError(f"paired t-test needs at least 2 splits, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(z).all()):
        raise InvalidInputError("paired t-test scores must be finite numbers (found NaN or inf)")
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError(f"confidence must be between 0 and 1, got {confidence}")

    n = int(x.size)
    df = n - 1
    diff = x - z
    mean_diff = float(diff.mean())
    scale = max(1.0, float(np.abs(diff).max()))
    if float(np.ptp(diff)) <= _ZERO_SPREAD_RTOL * scale:
        if abs(mean_diff) <= _ZERO_SPREAD_RTOL * scale:
            statistic, pvalue, mean_diff = 0.0, 1.0, 0.0
        else:
            statistic, pvalue = math.copysign(math.inf, mean_diff), 0.0
        return PairedTTest(
            statistic=statistic,
            pvalue=pvalue,
            mean_diff=mean_diff,
            ci_low=mean_diff,
            ci_high=mean_diff,
            n=n,
            df=df,
            confidence=confidence,
            zero_variance=True,
        )

    result = stats.ttest_rel(x, z)
    sem = float(diff.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df)) * sem
    return PairedTTest(
        statistic=float(result.statistic),
        pvalue=float(result.pvalue),
        mean_diff=mean_diff,
        ci_low=mean_diff - half,
        ci_high=mean_diff + half,
        n=n,
        df=df,
        confidence=confidence,
    )


@dataclass(frozen=True)
class McNemarTest:
    """Exact two-sided McNemar test of two models scored on the same test images.

    Attributes
    ----------
    a_only, b_only : int
        Images only ``a`` got right, and only ``b`` got right (the discordant pairs).
    pvalue : float
        Two-sided exact binomial p-value of ``a_only`` among ``a_only + b_only``
        at one half; ``1.0`` when there are no discordant pairs.
    mean_diff : float
        Accuracy of ``a`` minus accuracy of ``b``, ``(a_only - b_only) / n``.
    ci_low, ci_high : float
        Wald confidence interval of that difference for paired proportions.
    n : int
        Test images.
    confidence : float
        Level of the interval.
    """

    kind: ClassVar[str] = "mcnemar"

    a_only: int
    b_only: int
    pvalue: float
    mean_diff: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float = 0.95


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool], confidence: float = 0.95) -> McNemarTest:
    """Exact McNemar test of per-image correctness ``a_correct`` against ``b_correct`` (same images, same order).

    Raises
    ------
    InvalidInputError
        Lengths differ, no images, or a bad ``confidence``.
    """
    x = np.asarray(a_correct, dtype=bool)
    z = np.asarray(b_correct, dtype=bool)
    if x.ndim != 1 or x.shape != z.shape:
        raise InvalidInputError(f"McNemar's test needs the same test images for both runs: got {x.size} and {z.size}")
    if x.size == 0:
        raise InvalidInputError("McNemar's test needs at least one test image")
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError(f"confidence must be between 0 and 1, got {confidence}")
    n = int(x.size)
    a_only, b_only = int(np.sum(x & ~z)), int(np.sum(~x & z))
    discordant = a_only + b_only
    pvalue = float(stats.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    mean_diff = (a_only - b_only) / n
    se = math.sqrt(max(discordant - (a_only - b_only) ** 2 / n, 0.0)) / n
    half = float(stats.norm.ppf(0.5 + confidence / 2.0)) * se
    return McNemarTest(a_only=a_only, b_only=b_only, pvalue=pvalue, mean_diff=mean_diff,
                       ci_low=mean_diff - half, ci_high=mean_diff + half, n=n, confidence=confidence)
