"""Audit findings (``fs audit``, issue 25): rows of ``audit_findings`` and the image facts the audits read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, or_, select

from featurestore.catalog.common import Repository
from featurestore.catalog.schema import AuditFinding, Dataset, DatasetMember, Image, utcnow

_CHUNK = 5_000

AUDITS = ("leaks", "outliers", "images")
KINDS = ("leak", "outlier", "blurred", "dark", "bright", "constant", "tiny", "aspect")
"""What the web grid filters on (``/ui/browse?finding=outlier``)."""


@dataclass(frozen=True)
class Finding:
    """One finding: ``kind`` of image ``image_id`` (and ``other_image_id`` for a leak) with its measure."""

    audit: str
    kind: str
    image_id: int
    score: float
    detail: dict[str, Any] = field(default_factory=dict)
    other_image_id: int | None = None
    feature_set: str | None = None


@dataclass(frozen=True)
class ImageFacts:
    """What the photo audit needs of an image: where its file is, its size and its label."""

    id: int
    sha256: str
    source_path: str
    bytes: int
    width: int
    height: int
    label: str | None


class Audits(Repository):
    """Queries on `fs audit` findings."""

    def audit_facts(self, dataset: str | None = None) -> list[ImageFacts]:
        """Every image (of ``dataset``), by id."""
        q = select(Image.id, Image.sha256, Image.source_path, Image.bytes, Image.width, Image.height, Image.label)
        if dataset is not None:
            q = q.where(Image.id.in_(select(DatasetMember.image_id)
                                     .join(Dataset, Dataset.id == DatasetMember.dataset_id)
                                     .where(Dataset.name == dataset)))
        with self.engine.connect() as conn:
            return [ImageFacts(int(r[0]), r[1], r[2], int(r[3]), int(r[4]), int(r[5]), r[6])
                    for r in conn.execute(q.order_by(Image.id))]

    def replace_findings(self, audit: str, examined: Sequence[int], findings: Sequence[Finding]) -> None:
        """Replace the findings of ``audit`` about the ``examined`` images by ``findings``, in one transaction.

        A leak belongs to both of its images: it is replaced when either was examined.
        """
        ids = [int(i) for i in examined]
        with self.engine.begin() as conn:
            for start in range(0, len(ids), _CHUNK):
                part = ids[start : start + _CHUNK]
                conn.execute(delete(AuditFinding).where(AuditFinding.audit == audit, or_(
                    AuditFinding.image_id.in_(part), AuditFinding.other_image_id.in_(part))))
            now = utcnow()
            rows = [{"audit": f.audit, "kind": f.kind, "image_id": f.image_id, "other_image_id": f.other_image_id,
                     "score": float(f.score), "feature_set": f.feature_set, "detail": f.detail, "created_at": now}
                    for f in findings]
            for start in range(0, len(rows), _CHUNK // 10):
                conn.execute(insert(AuditFinding), rows[start : start + _CHUNK // 10])

    def findings(self, audit: str | None = None, kind: str | None = None, limit: int | None = None,
                 highest_first: bool = False) -> list[Finding]:
        """Stored findings (of one audit / kind), by id or (``highest_first``) by decreasing score; at most
        ``limit``."""
        q = select(AuditFinding)
        if audit is not None:
            q = q.where(AuditFinding.audit == audit)
        if kind is not None:
            q = q.where(AuditFinding.kind == kind)
        q = q.order_by(AuditFinding.score.desc(), AuditFinding.id) if highest_first else q.order_by(AuditFinding.id)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [Finding(r.audit, r.kind, int(r.image_id), float(r.score), dict(r.detail or {}), r.other_image_id,
                            r.feature_set) for r in conn.execute(q)]
