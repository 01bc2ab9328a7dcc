"""Label issues from out-of-fold class probabilities (cleanlab's confident learning).

The probabilities must come from models that did not train on the row
(``fs train/evaluate --folds K``): in-sample probabilities have memorised many
wrong labels and hide them. cleanlab is imported when called (it pulls pandas).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featurestore.errors import InvalidInputError


@dataclass(frozen=True)
class LabelIssues:
    """Per-row findings, in the rows' order."""

    quality: np.ndarray
    """cleanlab's label-quality score (self-confidence), 0..1, lower is worse."""
    flagged: np.ndarray
    """cleanlab's ``find_label_issues`` mask (confident learning, prune by noise rate)."""
    suggested: np.ndarray
    """Column of the most probable class other than the given one."""
    estimated_issues: int
    """cleanlab's estimate of how many labels are wrong (``num_label_issues``)."""

    def order(self, tiebreak: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Row indices worst first (lowest quality; ties by ``tiebreak``, e.g. image ids)."""
        keys = np.arange(len(self.quality)) if tiebreak is None else np.asarray(tiebreak)
        return np.lexsort((keys, self.quality))


def find_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> LabelIssues:
    """Rank and flag likely wrong labels.

    Parameters
    ----------
    labels : ndarray of int, shape (n_samples,)
        Given label of each row as a column index of ``probabilities``.
    probabilities : ndarray of shape (n_samples, n_classes)
        Out-of-fold class probabilities; each row sums to 1.

    Returns
    -------
    LabelIssues
    """
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise InvalidInputError(f"labels {labels.shape} and probabilities {probs.shape} do not match")
    n_classes = probs.shape[1]
    if n_classes < 2 or labels.size < 2:
        raise InvalidInputError(f"need at least 2 rows and 2 classes to find label issues, got {probs.shape}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise InvalidInputError("labels must be column indices of the probabilities")
    missing = np.setdiff1d(np.arange(n_classes), labels)
    if missing.size:
        # cleanlab assumes every class is someone's given label; a class nobody holds any more
        # (all its images relabelled) would misalign its confident joint.
        raise InvalidInputError(f"{missing.size} class(es) of the probabilities are nobody's given label")
    # n_jobs=1: the answer does not depend on it, and a process pool is slower than it saves here.
    flagged = np.asarray(cl_find(labels, probs, n_jobs=1), dtype=bool)
    quality = np.asarray(get_label_quality_scores(labels, probs), dtype=np.float64)
    others = probs.copy()
    others[np.arange(labels.size), labels] = -np.inf
    suggested = np.argmax(others, axis=1)
    estimated = int(num_label_issues(labels, probs))
    return LabelIssues(quality=quality, flagged=flagged, suggested=suggested, estimated_issues=estimated)
