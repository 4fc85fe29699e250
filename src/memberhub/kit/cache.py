"""Per-process caches of the rows nearly every request reads and almost none changes: API
keys, the program's settings, the tier ladder.

Bounded staleness: a value is kept `ttl_seconds` (the `CACHE_TTL_SECONDS` setting, 5 s by
default). A change committed through this process empties the caches that watch the changed
model as the transaction commits, so this process never serves the old value after it.
It then touches a stamp file in DATA_DIR; every process sharing that directory (the
processes of `memberhub serve --processes N`, the CLI) checks the stamp on each lookup and
empties its caches when it moved, so they too see the change at once. A change committed by
a process on another machine is seen within the TTL. A transaction that changed a watched
model reads through the cache until it ends, so it always sees its own change.

Loaded values are built outside any session (see `detached`), so no session's rollback or
expiry can reach them; treat them as read-only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

K = TypeVar("K")
V = TypeVar("V")
M = TypeVar("M")

_TOUCHED = "memberhub.caches_touched"
# In DATA_DIR: moved by a process that changed a watched model, for the others to see.
STAMP_FILE = "cache.stamp"
DEFAULT_TTL_SECONDS = 5.0


class ProcessCache(Generic[K, V]):
    """Values by key for `ttl_seconds`, emptied when a watched model changes here."""

    caches: ClassVar[list[ProcessCache[Any, Any]]] = []
    ttl_seconds: ClassVar[float] = DEFAULT_TTL_SECONDS
    # Touched after a commit that changed a watched model (see the module's docstring).
    stamp_path: ClassVar[Path | None] = None
    _stamp_seen: ClassVar[int] = 0

    def __init__(self, name: str, *, watches: tuple[type, ...], max_entries: int = 4096) -> None:
        self.name = name
        self.watches = watches
        self.max_entries = max_entries
        self._values: dict[K, tuple[float, V]] = {}
        # Bumped on every invalidation: a load that began before it is not stored.
        self._generation = 0
        ProcessCache.caches.append(self)

    async def get_or_load(
        self, session: AsyncSession, key: K, load: Callable[[], Awaitable[V]]
    ) -> V:
        if self.name in session.sync_session.info.get(_TOUCHED, ()):
            return await load()
        return await self.get_or_load_outside(key, load)

    async def get_or_load_outside(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """`get_or_load` for a caller with no transaction of its own (that might have
        changed a watched model): `load` opens one only when the value is not held."""
        ProcessCache._follow_stamp()
        now = time.monotonic()
        held = self._values.get(key)
        if held is not None and held[0] > now:
            return held[1]
        generation = self._generation
        value = await load()
        # Absence is not kept: a row another process adds is found at once.
        if value is not None and generation == self._generation and self.ttl_seconds > 0:
            if len(self._values) >= self.max_entries:
                self._values.clear()
            self._values[key] = (now + self.ttl_seconds, value)
        return value

    def clear(self) -> None:
        self._generation += 1
        self._values.clear()

    @classmethod
    def configure(cls, ttl_seconds: float, stamp_path: Path | None = None) -> None:
        cls.ttl_seconds = ttl_seconds
        cls.stamp_path = stamp_path
        cls._stamp_seen = _stamp_of(stamp_path)
        cls.clear_all()

    @classmethod
    def _follow_stamp(cls) -> None:
        """Empty every cache when another process sharing the stamp changed a watched model."""
        if cls.stamp_path is None:
            return
        stamp = _stamp_of(cls.stamp_path)
        if stamp != cls._stamp_seen:
            cls._stamp_seen = stamp
            cls.clear_all()

    @classmethod
    def touch_stamp(cls) -> None:
        if cls.stamp_path is None:
            return
        stamp = time.time_ns()
        try:
            with open(cls.stamp_path, "a"):
                pass
            os.utime(cls.stamp_path, ns=(stamp, stamp))
        except OSError:
            return  # no DATA_DIR here: other processes fall back on the TTL
        cls._stamp_seen = _stamp_of(cls.stamp_path)

    @classmethod
    def clear_all(cls) -> None:
        for cache in cls.caches:
            cache.clear()


def _stamp_of(path: Path | None) -> int:
    try:
        return os.stat(path).st_mtime_ns if path is not None else 0
    except OSError:
        return 0


def detached(model: type[M], row: Any) -> M:
    """A model instance built from a Core row, belonging to no session."""
    return model(**dict(row._mapping))


@event.listens_for(Session, "after_flush")
def _note_changes(session: Session, _context: object) -> None:
    changed = [*session.new, *session.dirty, *session.deleted]
    if not changed:
        return
    for cache in ProcessCache.caches:
        if any(isinstance(obj, cache.watches) for obj in changed):
            touched: set[str] = session.info.setdefault(_TOUCHED, set())
            touched.add(cache.name)
            # Another session of this process must not store what it read before the commit.
            cache.clear()


@event.listens_for(Session, "after_commit")
def _invalidate_after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return
    names = session.info.pop(_TOUCHED, None)
    if names:
        for cache in ProcessCache.caches:
            if cache.name in names:
                cache.clear()
        ProcessCache.touch_stamp()


@event.listens_for(Session, "after_soft_rollback")
def _forget_after_rollback(session: Session, _previous: object) -> None:
    if not session.in_transaction():
        session.info.pop(_TOUCHED, None)
