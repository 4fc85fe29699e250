"""Work held on a session until it commits (outbox events, audit entries), kept in step
with savepoints.

A list under `session.info[key]` collects what the commit hook writes. A savepoint that
rolls back drops what was added inside it and keeps the rest; a full rollback drops
everything. Commit hooks skip savepoint releases (`is_savepoint_release`), which SQLAlchemy
also reports as `before_commit`, so the work is written once, at the real commit.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction


def pending(session: Session, key: str) -> list[Any]:
    held: list[Any] = session.info.setdefault(key, [])
    return held


def is_savepoint_release(session: Session) -> bool:
    return session.in_nested_transaction()


def track_savepoints(key: str) -> None:
    """Register the listeners that keep `session.info[key]` in step with rollbacks."""
    marks_key = f"{key}.savepoints"

    @event.listens_for(Session, "after_transaction_create")
    def _mark(session: Session, transaction: SessionTransaction) -> None:
        if transaction.nested:
            marks: dict[int, int] = session.info.setdefault(marks_key, {})
            marks[id(transaction)] = len(session.info.get(key, []))

    @event.listens_for(Session, "after_soft_rollback")
    def _drop(session: Session, previous: SessionTransaction) -> None:
        marks: dict[int, int] = session.info.get(marks_key, {})
        if previous.nested:
            mark = marks.pop(id(previous), None)
            held = session.info.get(key)
            if mark is not None and held is not None:
                del held[mark:]
        elif previous.parent is None:
            session.info.pop(key, None)
            session.info.pop(marks_key, None)

    @event.listens_for(Session, "after_commit")
    def _forget(session: Session) -> None:
        if not session.in_nested_transaction():
            session.info.pop(marks_key, None)
