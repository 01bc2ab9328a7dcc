"""Trained models: the ``models`` table."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from featurestore.catalog.common import Repository
from featurestore.catalog.schema import Model


class Models(Repository):
    """Queries on the models table."""

    def models(self) -> dict[str, Model]:
        with self.session() as s:
            return {m.name: m for m in s.scalars(select(Model))}

    def model(self, name: str) -> Model | None:
        with self.session() as s:
            return s.scalar(select(Model).where(Model.name == name))

    def save_model(self, name: str, **fields: Any) -> Model:
        """Insert or update the model named ``name``."""
        with self.session() as s:
            row = s.scalar(select(Model).where(Model.name == name)) or Model(name=name)
            for key, value in fields.items():
                setattr(row, key, value)
            s.add(row)
            s.flush()
            return row
