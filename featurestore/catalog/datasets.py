"""Datasets: removing one an ingest created but could not fill (issue 32)."""

from __future__ import annotations

from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import Session

from featurestore.catalog.schema import Dataset, DatasetMember, Image, IngestError


def dataset_exists(s: Session, name: str) -> bool:
    return s.scalar(select(exists().where(Dataset.name == name))) is True


def drop_if_empty(s: Session, dataset_id: int) -> bool:
    """Delete a dataset with no members and no images first ingested into it; its ingest errors are kept
    (without the dataset). Returns whether it was deleted."""
    used = s.scalar(select(exists().where(DatasetMember.dataset_id == dataset_id))) or \
        s.scalar(select(exists().where(Image.dataset_id == dataset_id)))
    if used:
        return False
    s.execute(update(IngestError).where(IngestError.dataset_id == dataset_id).values(dataset_id=None))
    s.execute(delete(Dataset).where(Dataset.id == dataset_id))
    return True
