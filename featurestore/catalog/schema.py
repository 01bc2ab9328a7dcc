"""The catalog schema (SQLAlchemy 2 declarative models).

The schema is created and changed only by the Alembic migrations in
``migrations/versions``; ``tests/test_migrations.py`` checks both agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Image(Base):
    """One distinct image content (by sha256); duplicates are stored once."""

    __tablename__ = "images"
    __table_args__ = (Index("ix_images_label", "label"), Index("ix_images_dataset_id", "dataset_id"),
                      Index("ix_images_superclass", "superclass"))  # migration 0005 (web app filter)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    source_path: Mapped[str] = mapped_column(Text)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(20))
    mode: Mapped[str] = mapped_column(String(20))
    bytes: Mapped[int] = mapped_column(BigInteger)
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    superclass: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The dataset the content was first ingested into; membership is in dataset_members.
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    ingested_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class DatasetMember(Base):
    """An image's membership of a dataset, with the path it was ingested from there.

    One stored image (one content) can belong to several datasets: the same
    product photo in two catalogues, or a benchmark's train and test lists.
    """

    __tablename__ = "dataset_members"
    __table_args__ = (Index("ix_dataset_members_image_id", "image_id"),)

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    source_path: Mapped[str] = mapped_column(Text)
    added_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class IngestError(Base):
    """A file that could not be ingested, with the reason; the latest attempt per path."""

    __tablename__ = "ingest_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class FeatureSet(Base):
    __tablename__ = "feature_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(50))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    dim: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class FeatureShard(Base):
    """One HDF5 file under ``features/<feature_set>/`` (path relative to the store)."""

    __tablename__ = "feature_shards"
    __table_args__ = (Index("ix_feature_shards_feature_set_id", "feature_set_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feature_set_id: Mapped[int] = mapped_column(ForeignKey("feature_sets.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text, unique=True)
    rows: Mapped[int] = mapped_column(Integer)
    # What computed the vectors (CNN sets: "onnxruntime" or "mxnet"; several joined by "," after
    # `fs compact`); not part of the set's params, so a set may be continued on another runtime.
    runtime: Mapped[str | None] = mapped_column(String(50), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Migration 0011 (issue 32): sha256 of the file's bytes at registration, checked before every first
    # open in a process and by `fs verify`; binds the file to this row (and so to its feature set).
    # NULL for shards registered before it (read, reported by `fs verify` as without a digest).
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class FeatureRow(Base):
    """Which shard and row hold an image's vector in a feature set."""

    __tablename__ = "feature_rows"
    __table_args__ = (Index("ix_feature_rows_shard_id", "shard_id"),)

    feature_set_id: Mapped[int] = mapped_column(
        ForeignKey("feature_sets.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    shard_id: Mapped[int] = mapped_column(ForeignKey("feature_shards.id", ondelete="CASCADE"))
    row: Mapped[int] = mapped_column(Integer)


class Model(Base):
    """A CNN checkpoint registered in the store (files under ``models/``)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    symbol_path: Mapped[str] = mapped_column(Text)
    params_path: Mapped[str] = mapped_column(Text)
    symbol_sha256: Mapped[str] = mapped_column(String(64))
    params_sha256: Mapped[str] = mapped_column(String(64))
    preprocess: Mapped[dict[str, Any]] = mapped_column(JSON)
    taps: Mapped[list[Any]] = mapped_column(JSON)
    default_tap: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)
    # The checkpoint exported to ONNX with every tap as an output (for onnxruntime); NULL when the
    # model was registered before featurestore made exports, or its graph cannot be exported.
    onnx_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    onnx_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Run(Base):
    """One training/evaluation run: what was trained, how, and how well."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(20))
    features: Mapped[list[Any]] = mapped_column(JSON)
    feature_params: Mapped[dict[str, Any]] = mapped_column(JSON)
    target: Mapped[str] = mapped_column(String(20))
    selection: Mapped[dict[str, Any]] = mapped_column(JSON)
    classifier: Mapped[str] = mapped_column(String(20))
    classifier_params: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    n_splits: Mapped[int] = mapped_column(Integer)
    test_size: Mapped[float] = mapped_column(Float)
    split_scheme: Mapped[str] = mapped_column(String(20))
    splits_fingerprint: Mapped[str] = mapped_column(String(64))
    n_images: Mapped[int] = mapped_column(Integer)
    dataset: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The fixed-test protocol: the held-out dataset, and how many selected images it took out of training.
    test_dataset: Mapped[str | None] = mapped_column(String(200), nullable=True)
    n_test_overlap: Mapped[int | None] = mapped_column(Integer, nullable=True)
    accuracy_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    macro_f1_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    superclass_accuracy_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON)
    artifact_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    comparison_group: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Label history (migration 0009): the last label_changes id when the run read its labels (0: none
    # yet), and, for K-fold runs, the column order of run_oof.probabilities.
    label_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    oof_classes: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # Neighbours per vote in run_oof.neighbours (migration 0015); NULL when the run kept no votes.
    oof_neighbours: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Honest splits (issue 25, migration 0010): near-duplicate groups (cosine >= group_threshold in
    # group_features) never straddle a split; n_groups counts the groups of two or more images, and
    # n_near_overlap the training images left out as near-duplicates of a test image (also in n_test_overlap).
    group_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    group_features: Mapped[str | None] = mapped_column(String(200), nullable=True)
    n_groups: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_near_overlap: Mapped[int | None] = mapped_column(Integer, nullable=True)


class RunSplit(Base):
    __tablename__ = "run_splits"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    split: Mapped[int] = mapped_column(Integer, primary_key=True)
    test_accuracy: Mapped[float] = mapped_column(Float)
    train_accuracy: Mapped[float] = mapped_column(Float)
    macro_f1: Mapped[float] = mapped_column(Float)
    superclass_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    fit_seconds: Mapped[float] = mapped_column(Float)
    n_train: Mapped[int] = mapped_column(Integer)
    n_test: Mapped[int] = mapped_column(Integer)


class RunTestPrediction(Base):
    """What a fixed-test run's model predicted for each image of its test dataset.

    Written with the run (``fs train`` / ``fs evaluate --test-dataset``) so that
    ``fs compare`` can pair two such runs image by image (McNemar's test).
    ``correct`` is the comparison with the label the image had at evaluation time.
    """

    __tablename__ = "run_test_predictions"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    predicted: Mapped[str] = mapped_column(String(200))
    correct: Mapped[bool] = mapped_column(Boolean)


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("run_id", "image_id", name="uq_predictions_run_id_image_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(200))
    probability: Mapped[float] = mapped_column(Float)
    top5: Mapped[list[Any]] = mapped_column(JSON)
    predicted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AnnIndex(Base):
    """An approximate nearest-neighbour (HNSW) index over a feature set (one per set; issue 14).

    The index file lives under ``indexes/<feature_set>/`` (``path`` relative to
    the store). ``shard_ids`` lists the feature shards whose live rows it holds;
    vectors in other shards are searched exactly until the next ``fs index build``.
    """

    __tablename__ = "vector_indexes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feature_set_id: Mapped[int] = mapped_column(ForeignKey("feature_sets.id", ondelete="CASCADE"), unique=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    vectors: Mapped[int] = mapped_column(BigInteger)
    shard_ids: Mapped[list[Any]] = mapped_column(JSON)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# -- search caches (issue 31) ----------------------------------------------------------------------


class CatalogVersion(Base):
    """The catalog's change counter: one row (``id`` 1) whose ``version`` only grows.

    Triggers (migration 0012) bump it in the same transaction as every insert,
    update or delete on ``images``, ``datasets``, ``dataset_members``,
    ``feature_sets``, ``feature_shards`` and ``vector_indexes`` (``feature_rows``
    change only together with their shards), so a reader whose cached copy was made at the current counter knows it is
    still what the catalog holds (:mod:`featurestore.catalog.versions`).
    """

    __tablename__ = "catalog_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)


# -- label history and out-of-fold probabilities (migration 0009, issue 24) -----------------------


class RunOutOfFold(Base):
    """A K-fold run's out-of-fold class probabilities of one image (``fs train/evaluate --folds K``).

    ``probabilities`` is a JSON list in the order of the run's ``oof_classes``;
    ``label`` is the label the image had when the run read it, so a later
    correction does not change what the run was judged against. ``neighbours``
    (migration 0015; NULL for older runs and ``--neighbours 0``): the class
    fractions among the image's nearest training-part images, in the same order.
    """

    __tablename__ = "run_oof"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    fold: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(200))
    probabilities: Mapped[list[Any]] = mapped_column(JSON)
    neighbours: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class LabelChange(Base):
    """One change of an image's label (``fs labels set/import/undo``, the web app's review queue).

    Rows are never updated or deleted; ``images.label`` holds the newest
    ``new_label``. ``undoes`` names the change an undo reverted.
    """

    __tablename__ = "label_changes"
    __table_args__ = (Index("ix_label_changes_image_id", "image_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    old_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    old_superclass: Mapped[str | None] = mapped_column(String(200), nullable=True)
    new_label: Mapped[str] = mapped_column(String(200))
    new_superclass: Mapped[str | None] = mapped_column(String(200), nullable=True)
    changed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    changed_by: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    undoes: Mapped[int | None] = mapped_column(ForeignKey("label_changes.id"), nullable=True)


class LabelReview(Base):
    """A reviewer's "the label is right" for an image flagged by a run's audit (web app review queue):
    the image is no longer offered for that run."""

    __tablename__ = "label_reviews"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[str] = mapped_column(String(200))
    reviewed_by: Mapped[str] = mapped_column(String(200))
    reviewed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
# -- run names and notes (migration 0013) ------------------------------------------------------------


class RunNote(Base):
    """A run's human name and free-text notes (``fs runs name``, the web app's run page); one row per run."""

    __tablename__ = "run_notes"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
# -- honest splits and audits (issue 25, migration 0010) -------------------------------------------


class RunImage(Base):
    """Every image a run was evaluated on; a split's training part is these minus its test images."""

    __tablename__ = "run_images"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)


class RunSplitImage(Base):
    """The test images of each split of a run (so a protocol can be checked with ``fs sql``)."""

    __tablename__ = "run_split_images"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    split: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)


class AuditFinding(Base):
    """One finding of ``fs audit``: an outlier, a bad photo, or one side of a near-duplicate leak.

    ``audit`` is the command (leaks, outliers, images), ``kind`` the finding the web grid filters on
    (leak, outlier, blurred, dark, bright, constant, tiny, aspect); ``score`` its measure, whose
    meaning ``detail`` states. A new audit replaces the findings of the same audit for the images it examined.
    """

    __tablename__ = "audit_findings"
    __table_args__ = (Index("ix_audit_findings_kind_image_id", "kind", "image_id"),
                      Index("ix_audit_findings_image_id", "image_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    audit: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(20))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    other_image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), nullable=True)
    score: Mapped[float] = mapped_column(Float)
    feature_set: Mapped[str | None] = mapped_column(String(200), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
# -- feature-set versions (migration 0014, issue 26 item 5) -----------------------------------------


class FeatureSetVersion(Base):
    """One version of a feature set: ``fs extract --replace`` makes a new one and keeps the old.

    Every ``feature_sets`` row has one. The newest version keeps the set's own
    name; an older one's row is renamed ``<name>@v<version>`` (``@`` is not
    allowed in user names) and keeps its shards, rows and index, so a run that
    read it can still be reproduced. ``name`` is the set's name as users give it.
    """

    __tablename__ = "feature_set_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_feature_set_versions_name_version"),)

    feature_set_id: Mapped[int] = mapped_column(ForeignKey("feature_sets.id", ondelete="CASCADE"),
                                                primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RunFeatureVersion(Base):
    """The version of each feature set a run read (``fs predict`` with the run reads the same one).

    No foreign key to the version: ``fs gc --force`` may delete a version a run read, and the run then
    says so instead of silently reading another.
    """

    __tablename__ = "run_feature_versions"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    feature_set: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
