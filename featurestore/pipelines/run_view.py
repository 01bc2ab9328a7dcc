"""What the web app's run page and ``fs report`` show about a run.

The per-split scores come from ``run_splits``. The confusion matrix, the per-class
precision / recall / F1 and the most confident mistakes come from one of two
sources, joined with the images' catalogue labels (superclasses for a
``--target superclass`` run):

* ``test``: the predictions a fixed-test run (``--test-dataset``) made of its test
  dataset when it was evaluated (``run_test_predictions``): held out by
  construction, and what its accuracy was measured on. The default for such runs.
* ``stored``: the run's rows in the ``predictions`` table (written by ``fs predict
  --run ID`` or by predict with ``store=true``). Images the run's training
  selection may have held (labelled, in its dataset, ingested before the run) are
  counted and left out by default (``held_out_only``), because the final model was
  fitted on them and scores them optimistically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from featurestore.catalog.repository import (
    Mistake,
    PredictionCoverage,
    RunFacts,
    SplitRow,
)
from featurestore.catalog.schema import Run
from featurestore.pipelines.train import get_run
from featurestore.store import Store
from featurestore.training.confusion import Confusion


@dataclass
class RunView:
    run: Run
    facts: RunFacts
    splits: list[SplitRow]
    confusion: Confusion
    coverage: PredictionCoverage
    held_out_only: bool
    mistakes: list[Mistake] = field(default_factory=list)
    source_kind: str = "stored"  # "test" or "stored": where the confusion matrix comes from
    stored_predictions: int = 0  # rows in the predictions table (to offer them beside the test set)

    @property
    def truth(self) -> str:
        return "superclass" if self.facts.target == "superclass" else "label"



def run_view(store: Store, run_id: int, held_out_only: bool = False, mistakes: int = 0,
             source: str | None = None) -> RunView:
    """The run, its per-split scores, and the confusion matrix of its predictions.

    ``source`` is "test" (the fixed-test evaluation's predictions), "stored" (the predictions table) or
    None: the test predictions when the run has them, else the stored ones.

    Raises
    ------
    NotFoundError
        No such run.
    InvalidInputError
        ``source`` is "test" and the run has no test-set predictions.
    """
    run = get_run(store, run_id)
    facts = store.catalog.run_facts(run.id)
    kind = facts.source(source)
    held = held_out_only and kind == "stored"
    confusion = Confusion.from_counts(store.catalog.confusion_counts(facts, held, kind))
    stored = store.catalog.prediction_coverage(facts, "stored") if kind == "test" else None
    coverage = store.catalog.prediction_coverage(facts, kind)
    return RunView(run, facts, store.catalog.run_splits(run.id), confusion, coverage, held,
                   store.catalog.confident_mistakes(facts, mistakes, held, kind) if mistakes else [], kind,
                   (stored or coverage).stored)
