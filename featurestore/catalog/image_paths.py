"""Where each stored image's file is: updating the recorded path when photos move (issue 32)."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import update
from sqlalchemy.orm import Session

from featurestore.catalog.schema import DatasetMember, Image


def record_moves(s: Session, moves: Mapping[int, tuple[str, str]]) -> None:
    """Point images (id -> (old path, new path)) at their new file, in the caller's transaction.

    The image's ``source_path`` changes, and so does each dataset membership that
    recorded the old path (memberships recorded from another copy keep theirs).
    """
    for image_id, (old, new) in moves.items():
        s.execute(update(Image).where(Image.id == int(image_id)).values(source_path=new))
        s.execute(update(DatasetMember).where(DatasetMember.image_id == int(image_id),
                                              DatasetMember.source_path == old).values(source_path=new))
