"""Run names and notes (the ``run_notes`` table): what people call a run and what they noted about it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, insert, select

from featurestore.catalog.common import Repository
from featurestore.catalog.schema import Run, RunNote, utcnow
from featurestore.errors import InvalidInputError, NotFoundError

MAX_NAME = 200
MAX_NOTES = 20_000


@dataclass(frozen=True)
class RunNoteRow:
    run_id: int
    name: str | None
    notes: str | None


def _clean(value: str | None, what: str, limit: int) -> str | None:
    text = (value or "").strip()
    if "\x00" in text:
        raise InvalidInputError(f"the run {what} contains a NUL character")
    if len(text) > limit:
        raise InvalidInputError(f"a run {what} has at most {limit:,} characters, not {len(text):,}")
    return text or None


class RunNotes(Repository):
    """Names and notes people give runs."""

    def run_names(self) -> dict[int, str]:
        """Run id -> name, for the runs that have one."""
        with self.engine.connect() as conn:
            return {int(i): str(n) for i, n in conn.execute(select(RunNote.run_id, RunNote.name)
                                                             .where(RunNote.name.is_not(None)))}

    def run_note(self, run_id: int) -> RunNoteRow:
        """The run's name and notes (both None when it has none)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(RunNote.name, RunNote.notes).where(RunNote.run_id == run_id)).first()
        return RunNoteRow(run_id, None, None) if row is None else RunNoteRow(run_id, row[0], row[1])

    def set_run_note(self, run_id: int, name: str | None, notes: str | None = None, *,
                     keep_notes: bool = False) -> RunNoteRow:
        """Name a run and set its notes in one transaction (empty text clears; ``keep_notes`` leaves them as they are).

        Raises
        ------
        NotFoundError
            No such run.
        InvalidInputError
            A text is too long or holds a NUL character.
        """
        clean_name = _clean(name, "name", MAX_NAME)
        clean_notes = _clean(notes, "notes", MAX_NOTES)
        with self.engine.begin() as conn:
            if conn.execute(select(Run.id).where(Run.id == run_id)).first() is None:
                ids = [str(i) for i in conn.execute(select(Run.id).order_by(Run.id)).scalars()]
                raise NotFoundError("run", str(run_id), ids, remedy="see-runs")
            if keep_notes:
                clean_notes = conn.execute(select(RunNote.notes).where(RunNote.run_id == run_id)).scalar()
            conn.execute(delete(RunNote).where(RunNote.run_id == run_id))
            if clean_name is not None or clean_notes is not None:
                conn.execute(insert(RunNote).values(run_id=run_id, name=clean_name, notes=clean_notes,
                                                    updated_at=utcnow()))
        return RunNoteRow(run_id, clean_name, clean_notes)
