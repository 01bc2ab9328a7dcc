"""The catalog: every SQL statement featurestore runs on its own tables, reached through one object.

:class:`Catalog` wraps the engine of one catalog (SQLite or PostgreSQL) and is composed of one repository
class per aggregate, each in its own module:

==================  ===========================================================================
``images``          images, datasets and their members, ingest errors, saved selections
``feature_sets``    feature sets, their shards and the rows pointing into them
``versions``        the change counter and the per-set facts a search caches against it
``indexes``         approximate nearest-neighbour indexes
``models``          trained models
``runs``            runs, their splits, predictions and the reports read from them
``run_images``      the images each run used; ``run_notes``: run names; ``run_outcomes``: run vs run
``browse``          the web app's grid pages, counts and filter menus
``labels``          label history, reviews, out-of-fold probabilities
``audits``          `fs audit` findings; ``exports``: rows read for Arrow exports
==================  ===========================================================================

One style: each repository is a class whose methods read ``self.engine``, run their own short
transaction, or join the caller's transaction when given its :class:`~sqlalchemy.orm.Session` ``s``;
rows come back as plain values, frozen dataclasses or NamedTuples (never bare tuples read by index).
The rest of the library reaches SQL only through ``store.catalog`` (a :class:`Catalog`). User-written
SQL (``fs sql``, ``--where``) runs on a separate read-only connection
(:mod:`featurestore.catalog.readonly`), never through this class.

The record types and constants of the aggregates are re-exported here for the callers that name them.
"""

from __future__ import annotations

from featurestore.catalog.audits import KINDS as FINDING_KINDS
from featurestore.catalog.audits import Audits
from featurestore.catalog.browse import (
    MAX_PAGE,
    OUTCOMES,
    SORTS,
    Browse,
    Facets,
    ImageFilter,
    MenuCount,
    Page,
    RunChoice,
    Tile,
)
from featurestore.catalog.common import CHUNK, NAME_RE, check_ids, check_name, chunks
from featurestore.catalog.exports import Exports, LabelProbability
from featurestore.catalog.feature_sets import FeatureSets, LiveShard, SetCoverage, ShardRef, ShardSize, ShardTally
from featurestore.catalog.feature_versions import FeatureVersions, StoredVersion
from featurestore.catalog.images import (
    DatasetCount,
    DatasetExistsError,
    DatasetOverlap,
    ImageDetail,
    ImageFile,
    ImageLabels,
    ImageRow,
    Images,
    LabelCount,
    PathLabel,
    StoredContent,
)
from featurestore.catalog.indexes import IndexChangedError, Indexes, IndexKey, IndexRecord, IndexState
from featurestore.catalog.labels import Labels
from featurestore.catalog.models import Models
from featurestore.catalog.run_images import RunImageSets
from featurestore.catalog.run_notes import RunNotes
from featurestore.catalog.run_outcomes import RunOutcomes
from featurestore.catalog.runs import (
    ConfusionCount,
    Mistake,
    PredictedLabel,
    PredictionCoverage,
    RunFacts,
    SplitRow,
    StoredPrediction,
)
from featurestore.catalog.versions import RowsAtVersion, VectorAt, VectorLocation, Versions

__all__ = [
    "CHUNK", "FINDING_KINDS", "MAX_PAGE", "NAME_RE", "OUTCOMES", "SORTS", "Catalog", "DatasetExistsError",
    "Facets", "ImageFile", "ImageFilter", "IndexChangedError", "IndexRecord", "LiveShard", "Page",
    "PredictionCoverage", "RunFacts", "ShardRef", "SplitRow", "Tile", "check_ids", "check_name", "chunks",
    # records the repositories return instead of tuples
    "ConfusionCount", "DatasetCount", "DatasetOverlap", "ImageDetail", "ImageLabels", "ImageRow", "IndexKey",
    "IndexState", "LabelCount", "LabelProbability", "MenuCount", "Mistake", "PathLabel", "PredictedLabel",
    "RowsAtVersion", "RunChoice", "SetCoverage", "ShardSize", "ShardTally", "StoredContent", "StoredPrediction",
    "StoredVersion", "VectorAt", "VectorLocation",
]


class Catalog(Images, FeatureSets, FeatureVersions, Versions, Indexes, Models, Browse, RunImageSets, RunNotes,
              RunOutcomes, Labels, Audits, Exports):
    """All queries on the catalog tables: the one way in (``store.catalog``).

    Parameters
    ----------
    engine
        The SQLAlchemy engine of the catalog database.
    """
