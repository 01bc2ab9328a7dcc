"""Selections kept as datasets: a view of the grid (or a lasso on the map) saved under a name, and the paths of
images in bulk for exports."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine, insert, select

from featurestore.catalog.repository import CHUNK, check_name, chunks
from featurestore.catalog.schema import Dataset, DatasetMember, Image, utcnow
from featurestore.errors import InvalidInputError


class DatasetExistsError(InvalidInputError):
    """A selection would be saved under the name of an existing dataset."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a dataset named {name!r} already exists: pick another name", remedy="see-datasets",
                         name=name)


def paths_of(engine: Engine, image_ids: Sequence[int]) -> dict[int, str]:
    """Image id -> the path it was ingested from."""
    out: dict[int, str] = {}
    with engine.connect() as conn:
        for part in chunks(list(image_ids), CHUNK):
            out.update((int(i), str(p)) for i, p in conn.execute(select(Image.id, Image.source_path)
                                                                  .where(Image.id.in_(part))))
    return out


def save_as_dataset(engine: Engine, name: str, image_ids: Sequence[int]) -> int:
    """Create dataset ``name`` whose members are ``image_ids`` (one transaction); returns its member count.

    The members keep the path each image was ingested from, as ``fs ingest`` records them. Callers hold the
    store's write lock.

    Raises
    ------
    InvalidInputError
        A bad name, or no images.
    DatasetExistsError
        The name is taken (a selection never changes an existing dataset).
    """
    check_name("dataset", name)
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise InvalidInputError("no images match this view: nothing to save")
    now = utcnow()
    with engine.begin() as conn:
        if conn.execute(select(Dataset.id).where(Dataset.name == name)).first() is not None:
            raise DatasetExistsError(name)
        dataset_id = conn.execute(insert(Dataset).values(name=name, created_at=now).returning(Dataset.id)).scalar_one()
        for part in chunks(ids, CHUNK):
            rows = conn.execute(select(Image.id, Image.source_path).where(Image.id.in_(part))).all()
            if rows:
                conn.execute(insert(DatasetMember), [{"dataset_id": dataset_id, "image_id": int(i),
                                                      "source_path": str(p), "added_at": now} for i, p in rows])
    return len(ids)
