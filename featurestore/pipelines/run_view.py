"""What the web app's run page and ``fs report`` show about a run.

The per-split scores come from ``run_splits``. Repeated-split runs do not store
their test predictions (fixed-test runs keep theirs in ``run_test_predictions``,
which only ``fs compare`` reads so far), so the confusion matrix and the per-class
precision / recall / F1 are computed from the run's rows in the ``predictions`` table (written by
``fs predict --run ID`` or by predict with ``store=true``), joined with the
images' catalogue labels (superclasses for a ``--target superclass`` run).
Images the run's training selection may have held (labelled, in its dataset,
ingested before the run) are counted, and can be left out (``held_out_only``),
because the final model was fitted on them and scores them optimistically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from featurestore.catalog.repository import (
    PredictionCoverage,
    RunFacts,
    SplitRow,
    confident_mistakes,
    confusion_counts,
    prediction_coverage,
    run_facts,
    run_splits,
)
from featurestore.catalog.schema import Run
from featurestore.pipelines.train import get_run
from featurestore.store import Store
from featurestore.training.confusion import Confusion

CONFUSION_SOURCE = (
    "Computed from this run's stored predictions (the predictions table, written by `fs predict --run {id}`) "
    "joined with the images' catalogue {truth}s, not from the run's evaluation splits."
)


@dataclass
class RunView:
    run: Run
    facts: RunFacts
    splits: list[SplitRow]
    confusion: Confusion
    coverage: PredictionCoverage
    held_out_only: bool
    mistakes: list[tuple[int, str, str, float]] = field(default_factory=list)

    @property
    def truth(self) -> str:
        return "superclass" if self.facts.target == "superclass" else "label"

    @property
    def source(self) -> str:
        return CONFUSION_SOURCE.format(id=self.run.id, truth=self.truth)


def run_view(store: Store, run_id: int, held_out_only: bool = False, mistakes: int = 0) -> RunView:
    """The run, its per-split scores, and the confusion matrix of its stored predictions.

    Raises
    ------
    NotFoundError
        No such run.
    """
    run = get_run(store, run_id)
    facts = run_facts(store.engine, run.id)
    confusion = Confusion.from_counts(confusion_counts(store.engine, facts, held_out_only))
    return RunView(run, facts, run_splits(store.engine, run.id), confusion, prediction_coverage(store.engine, facts),
                   held_out_only, confident_mistakes(store.engine, facts, mistakes, held_out_only) if mistakes else [])
