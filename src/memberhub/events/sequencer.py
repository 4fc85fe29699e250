"""The sequencer: feed positions and the audit chain, assigned after commit.

A change inserts its events and audit entries with no position and no hash, and commits
without waiting on any other change. A sequencing pass then, in a short transaction of its
own, numbers the committed events that have no position yet, continuing from the highest
position, and links the committed audit entries not yet in the chain to the chain's head.
Passes run one at a time: a PostgreSQL advisory lock held by the pass (never by a change),
or SQLite's single writer.

Why a reader never skips an event: positions are written only by passes, passes commit one
after another, and each numbers from the highest position committed before it. A reader
therefore sees positions 1..N without a gap, whatever it reads and whenever. A transaction
that began early and commits late is not yet visible to the pass that numbers the changes
committed around it; its events are numbered by a later pass, above every position handed
out before, so a reader that already passed those positions still receives them next.

Order: events are numbered in the order they became visible; those that became visible
between two passes in the order they were written. Changes to one member are serialised by
its row lock (points changes lock it with the account: points/repository.py), so one
member's events always keep the order of its changes.

Sealing the audit chain takes the key derived from the master secret, which the session's
database carries (`audit/chain.py`). A database opened without it (a script's, say) numbers
events and leaves audit entries for the next pass that has it.

Who runs passes: the worker's sequencer loop (woken at once by commits in its own process,
and polling every `sequencer_interval_seconds` for other processes' commits), and anything
about to read what passes produce (the event feed, the audit log and its check, webhook
fan-out, worker ticks), so a reader never waits for the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, cast

import structlog
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    String,
    Table,
    Update,
    bindparam,
    case,
    func,
    null,
    select,
    text,
    update,
)
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from memberhub.audit.chain import GENESIS_HASH, ChainKey, entry_hash, session_key
from memberhub.audit.models import AuditEntry
from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database, advisory_xact_lock, array_rows, try_advisory_xact_lock

log = structlog.get_logger("memberhub.sequencer")

# An arbitrary constant naming the advisory lock that serialises sequencing passes.
SEQUENCER_LOCK = 7_320_114_002
# Rows numbered or linked per pass; a larger backlog takes several passes.
PASS_LIMIT = 5000
_MARK = "memberhub.sequence"

_EVENTS_PENDING = "SELECT EXISTS (SELECT 1 FROM events WHERE position IS NULL)"
_EVENTS_PENDING_ONLY = text(_EVENTS_PENDING)
_ANYTHING_PENDING = text(
    _EVENTS_PENDING + " OR EXISTS (SELECT 1 FROM audit_log WHERE chain_position IS NULL)"
)


@dataclass(frozen=True)
class PassResult:
    events: int
    audit_entries: int

    @property
    def full(self) -> bool:
        """The pass hit its limit: more may be waiting."""
        return self.events >= PASS_LIMIT or self.audit_entries >= PASS_LIMIT


class _Doorbell:
    """Wakes this process's sequencer loop when a transaction that wrote events or audit
    entries commits, so a single-process installation sequences them at once."""

    def __init__(self) -> None:
        self._waiters: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}

    def ring(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, waiter in list(self._waiters.items()):
            if loop is running:
                # Rung by a commit on the loop's own thread (as it nearly always is): set at
                # once, without the wake-up write `call_soon_threadsafe` makes.
                waiter.set()
                continue
            if loop.is_closed():
                self._waiters.pop(loop, None)
                continue
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(waiter.set)

    async def wait(self, seconds: float) -> bool:
        """Until the next ring, or `seconds` at most; whether it rang."""
        waiter = self._waiters.setdefault(asyncio.get_running_loop(), asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await waiter.wait()
        rang = waiter.is_set()
        waiter.clear()
        return rang


doorbell = _Doorbell()


def mark_for_sequencing(session: AsyncSession) -> None:
    """Note that the session's transaction wrote rows for the sequencer."""
    session.sync_session.info[_MARK] = True


@sa_event.listens_for(Session, "after_commit")
def _ring_after_commit(session: Session) -> None:
    if not session.in_nested_transaction() and session.info.pop(_MARK, False):
        doorbell.ring()


@sa_event.listens_for(Session, "after_soft_rollback")
def _forget_after_rollback(session: Session, previous: object) -> None:
    if not session.in_transaction():
        session.info.pop(_MARK, None)


class _Numbering:
    """The pass's statement that numbers events: each committed event without a position
    gets the next one, in the order of their ids. Events nobody will dispatch are marked
    dispatched in the same statement (see `set_dispatch_wanted`)."""

    def __init__(self) -> None:
        self._dispatch_wanted: ColumnElement[bool] | None = None
        self._statement: Update | None = None

    def want_dispatch_while(self, condition: ColumnElement[bool]) -> None:
        self._dispatch_wanted = condition
        self._statement = None  # built again, with it

    def statement(self) -> Update:
        if self._statement is None:
            self._statement = self._build()
        return self._statement

    def _build(self) -> Update:
        events = cast(Table, Event.__table__)
        pending = events.alias("pending")
        base = select(func.coalesce(func.max(events.c.position), 0)).correlate(None)
        numbered = (
            select(
                pending.c.id,
                func.row_number().over(order_by=pending.c.id).label("n"),
                base.scalar_subquery().label("base"),
            )
            .where(pending.c.position.is_(None))
            .order_by(pending.c.id)
            .limit(bindparam("limit"))
            .subquery("numbered")
        )
        values: dict[str, Any] = {"position": numbered.c.base + numbered.c.n}
        if self._dispatch_wanted is not None:
            now = bindparam("now", type_=events.c.dispatched_at.type)
            values["dispatched_at"] = case((self._dispatch_wanted, null()), else_=now)
        return update(events).where(events.c.id == numbered.c.id).values(values)


_numbering = _Numbering()


def set_dispatch_wanted(condition: ColumnElement[bool]) -> None:
    """Registered by the module that dispatches events (webhook fan-out): while `condition`
    is false, nothing would be dispatched for an event (no endpoint is enabled), and a pass
    marks the events it numbers as dispatched, sparing fan-out a second write of each. Until
    a condition is registered, every event waits for fan-out.

    The pass reads `condition` with the sequencer's lock held, so a change that must not miss
    events numbered after it (an endpoint created) takes that lock before it commits."""
    _numbering.want_dispatch_while(condition)


async def _number_events(session: AsyncSession) -> int:
    result = await session.execute(_numbering.statement(), {"limit": PASS_LIMIT, "now": utcnow()})
    return max(int(getattr(result, "rowcount", 0) or 0), 0)


# Key ids this process was told about already, when it extended a chain sealed under another.
_warned_key_ids: set[str] = set()


def _warn_of_other_key(head_seal: str | None, key: ChainKey) -> None:
    if head_seal is None or head_seal == key.seal or head_seal in _warned_key_ids:
        return
    _warned_key_ids.add(head_seal)
    # Not a reason to stop: entries left unlinked would be missing from the log. `audit
    # verify` names the entries whose seal this key cannot check.
    log.warning("audit_chain_sealed_under_another_key", head_seal=head_seal, own_seal=key.seal)


async def _link_audit_entries(session: AsyncSession) -> int:
    key = session_key(session)
    if key is None:
        return 0
    table = cast(Table, AuditEntry.__table__)
    entries = (
        await session.execute(
            select(table)
            .where(table.c.chain_position.is_(None))
            .order_by(table.c.id)
            .limit(PASS_LIMIT)
        )
    ).all()
    if not entries:
        return 0
    head = (
        await session.execute(
            select(table.c.chain_position, table.c.hash, table.c.seal)
            .where(table.c.chain_position.is_not(None))
            .order_by(table.c.chain_position.desc())
            .limit(1)
        )
    ).first()
    position, prev_hash = (head[0], head[1]) if head is not None else (0, GENESIS_HASH)
    if head is not None:
        _warn_of_other_key(head[2], key)
    links = []
    for entry in entries:
        position += 1
        # `entry` was read back from the database: sealed is what a later check reads.
        digest = entry_hash(entry, position=position, prev_hash=prev_hash, key=key)
        links.append(
            {
                "b_id": entry.id,
                "chain_position": position,
                "prev_hash": prev_hash,
                "hash": digest,
                "seal": key.seal,
            }
        )
        prev_hash = digest
    if session.get_bind().dialect.name == "postgresql":
        # One statement for the pass: an executemany would run an UPDATE per entry.
        await session.execute(
            _LINK_ENTRIES_PG,
            {
                "links_id": [link["b_id"] for link in links],
                "links_chain_position": [link["chain_position"] for link in links],
                "links_prev_hash": [link["prev_hash"] for link in links],
                "links_hash": [link["hash"] for link in links],
                "seal": key.seal,
            },
        )
    else:
        await session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values(
                chain_position=bindparam("chain_position"),
                prev_hash=bindparam("prev_hash"),
                hash=bindparam("hash"),
                seal=bindparam("seal"),
            ),
            links,
            execution_options={"synchronize_session": False},
        )
    return len(links)


def _link_entries_pg() -> Update:
    table = cast(Table, AuditEntry.__table__)
    links = array_rows(
        "links", id=BigInteger, chain_position=BigInteger, prev_hash=String, hash=String
    )
    return (
        update(table)
        .where(table.c.id == links.c.id)
        .values(
            chain_position=links.c.chain_position,
            prev_hash=links.c.prev_hash,
            hash=links.c.hash,
            seal=bindparam("seal", type_=String),
        )
    )


_LINK_ENTRIES_PG = _link_entries_pg()


async def sequence_pending(session: AsyncSession, *, wait: bool = True) -> PassResult | None:
    """One pass in the caller's transaction, which then holds the sequencer until it ends.

    With `wait=False`, None when another pass is running (PostgreSQL).
    """
    if wait:
        await session.run_sync(advisory_xact_lock, SEQUENCER_LOCK)
    elif not await session.run_sync(try_advisory_xact_lock, SEQUENCER_LOCK):
        return None
    return PassResult(await _number_events(session), await _link_audit_entries(session))


async def anything_pending(db: Database) -> bool:
    """Events to number, or audit entries to link when this database can seal them."""
    async with db.transaction(read_only=True, short=True) as session:
        query = _ANYTHING_PENDING if session_key(session) else _EVENTS_PENDING_ONLY
        return bool(await session.scalar(query))


async def run_passes(db: Database, *, wait: bool = True, look_first: bool = True) -> PassResult:
    """Sequence everything committed so far, a pass per transaction; (0, 0) when there was
    nothing to do or, with `wait=False`, another process is doing it. `look_first=False`
    when there is surely something to do: the first pass then runs without a read to check
    (on SQLite a pass takes the write lock, a read does not)."""
    events = entries = 0
    while not look_first or await anything_pending(db):
        look_first = True
        # `short`: a pass is a few statements over at most PASS_LIMIT rows; on SQLite they
        # run on the loop's thread, not each handed to a connection's thread and back.
        async with db.transaction(short=True) as session:
            result = await sequence_pending(session, wait=wait)
        if result is None:
            break
        events += result.events
        entries += result.audit_entries
        if not result.full:
            break
    return PassResult(events, entries)


async def catch_up(db: Database, session: AsyncSession) -> None:
    """Before reading what passes produce: sequence everything committed so far, then end
    `session`'s transaction, so its next statement reads from a snapshot that includes the
    pass (a SQLite transaction keeps the snapshot of its first read)."""
    await run_passes(db)
    if not session.in_transaction():
        return
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("catch_up needs a session with nothing to write")
    await session.commit()


# The longest wait between two tries of a failing pass.
FAILURE_BACKOFF_MAX = 5.0


class SequencerLoop:
    """The worker's sequencer: a pass whenever this process commits rows to sequence, and at
    least every `interval_seconds` for other processes' commits. While commits keep coming,
    passes are `min_gap_seconds` apart, each taking everything committed since the last: a
    pass costs about as much whatever it takes, so a busy loop runs few, large ones."""

    def __init__(
        self, db: Database, *, interval_seconds: float = 0.05, min_gap_seconds: float = 0.1
    ) -> None:
        self.db = db
        self.interval_seconds = interval_seconds
        self.min_gap_seconds = min_gap_seconds

    async def run(self, stop: asyncio.Event) -> None:
        # After a commit of this process or a pass that found work, there is surely (or most
        # likely) work: no read to check first.
        likely = False
        failures = 0
        while not stop.is_set():
            result = PassResult(0, 0)
            try:
                result = await run_passes(self.db, wait=False, look_first=not likely)
            except Exception as exc:
                # The database gone, say: the first failure with its traceback, then a line
                # each time while the wait between tries doubles up to FAILURE_BACKOFF_MAX.
                if failures == 0:
                    log.exception("sequencer_pass_failed")
                else:
                    log.warning(
                        "sequencer_pass_failed", error_type=type(exc).__name__, failures=failures
                    )
                failures += 1
                delay = min(FAILURE_BACKOFF_MAX, self.interval_seconds * 2**failures)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            if failures:
                log.info("sequencer_recovered", failures=failures)
                failures = 0
            if result.events or result.audit_entries:
                await asyncio.sleep(self.min_gap_seconds)
                likely = True
                continue
            likely = await doorbell.wait(self.interval_seconds)
