"""Confusion matrices from (true, predicted, count) triples, and the per-class scores they give.

The web app and ``fs report`` build them from a run's stored prediction rows
(SQL ``GROUP BY``), so the matrix is made from counts rather than from label arrays.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassScores:
    label: str
    precision: float | None  # None when nothing was predicted as this class
    recall: float | None  # None when no image of this class was predicted
    f1: float | None
    support: int  # images whose true class this is


@dataclass(frozen=True)
class Confusion:
    """``counts[i, j]``: images of true class ``labels[i]`` predicted as ``labels[j]``."""

    labels: list[str]
    counts: np.ndarray

    @classmethod
    def from_counts(cls, triples: Iterable[tuple[str, str, int]]) -> Confusion:
        rows = list(triples)
        labels = sorted({t for t, _, _ in rows} | {p for _, p, _ in rows})
        index = {lb: i for i, lb in enumerate(labels)}
        counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
        for t, p, n in rows:
            counts[index[t], index[p]] += int(n)
        return cls(labels, counts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def accuracy(self) -> float | None:
        return float(np.trace(self.counts) / self.total) if self.total else None

    def per_class(self) -> list[ClassScores]:
        """Precision, recall and F1 of each class (as scikit-learn's ``precision_recall_fscore_support``)."""
        tp = np.diag(self.counts).astype(float)
        predicted = self.counts.sum(axis=0).astype(float)
        actual = self.counts.sum(axis=1).astype(float)
        out = []
        for i, lb in enumerate(self.labels):
            p = tp[i] / predicted[i] if predicted[i] else None
            r = tp[i] / actual[i] if actual[i] else None
            f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else (
                0.0 if p is not None and r is not None else None)
            out.append(ClassScores(lb, p, r, f1, int(actual[i])))
        return out

    def macro_f1(self) -> float | None:
        """Mean F1 over every class seen as truth or prediction, undefined ones counting 0 (as scikit-learn)."""
        scores = [c.f1 if c.f1 is not None else 0.0 for c in self.per_class()]
        return float(np.mean(scores)) if scores else None
