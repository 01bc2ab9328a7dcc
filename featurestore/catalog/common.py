"""What every aggregate repository of the catalog shares: the engine, transactions, chunking, name checks.

Each aggregate module (``images``, ``feature_sets``, ``runs``...) defines one class derived from
:class:`Repository`; :class:`featurestore.catalog.repository.Catalog` composes them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from featurestore.catalog.database import driver_rows
from featurestore.errors import InvalidInputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
# Bound parameters per statement: SQLite allows 32,766, PostgreSQL 65,535.
CHUNK = 5_000


def chunks(values: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def check_ids(ids: Iterable[int], what: str = "image id") -> list[int]:
    """Ids as ints within SQL BIGINT range (a larger one cannot exist and would overflow the driver)."""
    out = []
    for i in ids:
        value = int(i)
        if not 1 <= value <= 2**63 - 1:
            raise InvalidInputError(f"{what} {value} is out of range; ids are positive integers below 2**63")
        out.append(value)
    return out


def check_name(what: str, name: str) -> str:
    """``name`` if it is a valid dataset / feature set / model name (letters, digits, '.', '_', '+', '-')."""
    if not NAME_RE.match(name):
        raise InvalidInputError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_', '+' or '-' (max 200 characters)"
        )
    return name


class Repository:
    """The engine of one catalog (SQLite or PostgreSQL) and the transactions its queries run in."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions.begin() as s:
            yield s

    @contextmanager
    def _within(self, s: Session | None) -> Iterator[Session]:
        """The caller's transaction ``s`` when given (it commits), else a new one of its own."""
        if s is not None:
            yield s
        else:
            with self.session() as new:
                yield new

    def _raw_rows(self, query: Any) -> list[tuple[Any, ...]]:
        """Rows as plain DB-API tuples (ORM rows cost seconds per million images).

        Only for queries whose bound values are integers or names we produced,
        which are rendered inline.
        """
        sql = str(query.compile(dialect=self.engine.dialect, compile_kwargs={"literal_binds": True}))
        return driver_rows(self.engine, sql)
