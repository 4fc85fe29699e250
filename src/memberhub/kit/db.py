"""Database plumbing: declarative base, portable column types, engines and sessions."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import cache, partial
from typing import Any, TypeVar

import aiosqlite
from asyncpg.exceptions import (
    CannotConnectNowError,
    ConnectionDoesNotExistError,
    InvalidAuthorizationSpecificationError,
    InvalidCatalogNameError,
    TooManyConnectionsError,
)
from sqlalchemy import (
    JSON,
    BigInteger,
    BindParameter,
    Connection,
    DateTime,
    Dialect,
    Integer,
    MetaData,
    Table,
    TextClause,
    bindparam,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
)
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql import column as column_clause
from sqlalchemy.sql.expression import UpdateBase
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlalchemy.types import TypeDecorator

# What asyncpg and the socket layer raise, outside SQLAlchemy's DBAPIError, when the
# database cannot be reached or refuses the connection.
DATABASE_GONE: tuple[type[Exception], ...] = (
    ConnectionError,
    socket.gaierror,
    CannotConnectNowError,
    ConnectionDoesNotExistError,
    InvalidAuthorizationSpecificationError,
    InvalidCatalogNameError,
    TooManyConnectionsError,
)


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the database cannot be reached or refused the
    connection, rather than that a statement failed."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, DATABASE_GONE):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass an aware UTC datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class IdMixin:
    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)


# Core statements built once for the hot paths bind every column they write; these two give
# each such statement its parameters and their values.


def column_binds(
    table: Table, prefix: str, leave_out: tuple[str, ...]
) -> dict[str, BindParameter[Any]]:
    """A typed bind parameter `<prefix>_<column>` for each column of `table` but `leave_out`."""
    return {
        c.name: bindparam(f"{prefix}_{c.name}", type_=c.type)
        for c in table.c
        if c.name not in leave_out
    }


def column_values(
    table: Table, values: dict[str, Any], prefix: str, leave_out: tuple[str, ...]
) -> dict[str, Any]:
    """The parameters for `column_binds(table, prefix, leave_out)`: each column's value as
    given, else its constant default, else NULL (callable defaults, such as times, must be
    given). Keys of `values` that name no column are ignored."""
    defaults, keys = _column_defaults(table, prefix, leave_out)
    row = dict(defaults)
    for name, value in values.items():
        key = keys.get(name)
        if key is not None:
            row[key] = value
    return row


@cache
def _column_defaults(
    table: Table, prefix: str, leave_out: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A row of `column_values` before any value is given (in column order), and each
    column's parameter name."""
    defaults: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for column in table.c:
        if column.name in leave_out:
            continue
        key = keys[column.name] = f"{prefix}_{column.name}"
        default = column.default
        defaults[key] = default.arg if default is not None and default.is_scalar else None  # type: ignore[attr-defined]
    return defaults, keys


_Object = TypeVar("_Object")


def orm_object(cls: type[_Object], values: Mapping[str, Any]) -> _Object:
    """An object of the mapped class `cls` holding `values` (columns, and relationships
    already at hand), built as a loader builds one: without the constructor's attribute
    events, several times faster. For a row written with a Core statement: with its primary
    key set and `make_transient_to_detached`, it is clean, as if loaded, and once added to a
    session its later changes are UPDATEs (with their version check), never an INSERT."""
    instance: _Object = manager_of_class(cls).new_instance()
    instance.__dict__.update(values)
    return instance


def array_rows(alias: str, /, **columns: Any) -> TableValuedAlias:
    """PostgreSQL: rows made of one array parameter per column (`unnest(:alias_a, :alias_b)
    AS alias(a, b)`), each column typed as given and bound as `<alias>_<column>` (never a
    column's own name, which an UPDATE or INSERT would take as a value to write): many rows
    in one statement, prepared once whatever their number."""
    return (
        func.unnest(
            *(bindparam(f"{alias}_{name}", type_=ARRAY(kind)) for name, kind in columns.items())
        )
        .table_valued(*(column_clause(name, kind) for name, kind in columns.items()))
        .render_derived(name=alias)
    )


class DriverStatement:
    """A Core statement for a hot path, sent on an inline SQLite connection (see
    `_InlineSQLiteConnection`) straight to the driver: compiled once per dialect, its
    parameters bound by name and converted by their types' processors as SQLAlchemy would,
    without an execution context, a result object or a cache lookup per execution.

    Anywhere else (PostgreSQL, a connection running on its own thread), and whenever the
    engine has listeners on statement execution (tracing, a statement count), it runs through
    SQLAlchemy as usual, so they see every statement. A statement the driver refuses (a
    unique index, say) is run again through SQLAlchemy, which raises its usual error (a
    failed statement changes nothing in SQLite), unless the error ended the transaction.
    Returned columns must need no conversion (ids, counts).
    """

    def __init__(self, statement: UpdateBase) -> None:
        self.statement = statement
        self._compiled: weakref.WeakKeyDictionary[Dialect, _Compiled] = weakref.WeakKeyDictionary()

    def rows(self, connection: Connection, parameters: Mapping[str, Any]) -> list[Any]:
        """The statement's rows (none without RETURNING), as tuples."""
        driver = connection.connection.driver_connection
        dispatch = connection.dispatch
        if (
            not isinstance(driver, _InlineSQLiteConnection)
            or dispatch.before_cursor_execute
            or dispatch.after_cursor_execute
        ):
            return self._through_sqlalchemy(connection, parameters)
        compiled = self._compiled.get(connection.dialect)
        if compiled is None:
            compiled = self._compiled[connection.dialect] = _Compiled(
                self.statement, connection.dialect
            )
        try:
            return driver.execute_now(compiled.sql, compiled.values(parameters))
        except sqlite3.Error:
            if not driver.in_transaction:
                raise  # an error that ended the transaction (a full disk): nothing to rerun in
            # Refused, it changed nothing: SQLAlchemy raises its own error for the same
            # refusal, and answers if the cause has passed.
            return self._through_sqlalchemy(connection, parameters)

    def _through_sqlalchemy(
        self, connection: Connection, parameters: Mapping[str, Any]
    ) -> list[Any]:
        result = connection.execute(self.statement, parameters)
        return [tuple(row) for row in result] if result.returns_rows else []


class _Compiled:
    def __init__(self, statement: UpdateBase, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if compiled.positiontup is None:
            raise TypeError(f"{dialect.name} does not bind parameters by position")
        for column in statement.exported_columns:
            processor = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if processor is not None:
                raise TypeError(f"{column} needs converting when read")
        self.sql = compiled.string
        # (name, whether the caller gives it, its value otherwise, its type's processor)
        self.binds: list[tuple[str, bool, Any, Callable[[Any], Any] | None]] = []
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            # A literal in the statement (coalesce(max(id), 0) + 1) binds its own value.
            self.binds.append((name, bind.required, bind.effective_value, processor))

    def values(self, parameters: Mapping[str, Any]) -> list[Any]:
        values = []
        for name, required, own, processor in self.binds:
            value = parameters[name] if required else parameters.get(name, own)
            values.append(value if processor is None else processor(value))
        return values


def create_engine(
    url: str, *, pool_size: int = 10, echo: bool = False, inline: bool = False
) -> AsyncEngine:
    """Create the async engine, with SQLite set up for WAL and explicit transactions.

    `inline` (SQLite only): statements run on the event loop's thread, see
    `_InlineSQLiteConnection`.
    """
    if url.startswith("sqlite"):
        # Parameters are member data: keep them out of error messages and logs.
        options: dict[str, Any] = {"connect_args": {"timeout": 30}}
        if inline:
            path = make_url(url).database or ":memory:"
            options = {"async_creator": partial(_connect_inline, path)}
        engine = create_async_engine(url, echo=echo, hide_parameters=True, **options)
        _configure_sqlite(engine.sync_engine, inline=inline)
        return engine
    engine = create_async_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        hide_parameters=True,
        # Named in pg_stat_activity, so an operator (and `backup restore`) can tell them.
        connect_args={"server_settings": {"application_name": "memberhub"}},
    )
    _ping_idle_connections(engine.sync_engine)
    return engine


# A pooled connection unused this long is checked before it is handed out; busy ones are not.
IDLE_PING_SECONDS = 10.0


def _ping_idle_connections(engine: Engine) -> None:
    """Pre-ping only connections that sat idle: a busy pool pays no round trip per checkout,
    and one the server dropped while idle (a restart, an idle timeout) is replaced before a
    request sees it. A connection failing on its first use anyway is discarded by the pool
    and its request answered 503 (`kit/http.py`), to be retried."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool discards this connection and checks out another.
            raise DisconnectionError("an idle connection was dropped") from exc


class _InlineSQLiteConnection(aiosqlite.Connection):
    """aiosqlite, but a statement runs on the calling (event loop's) thread instead of being
    handed to the connection's thread and back: a request's dozen statements cost no thread
    hand-offs, which otherwise take most of the CPU a SQLite request uses, and a write
    transaction holds the write lock only while its own statements run.

    Nothing here waits on the loop's thread: the connection's busy timeout is zero, so a
    statement that would wait for another process's lock (`BEGIN IMMEDIATE` while another
    process writes) fails at once and is run again in the connection's thread, where it waits
    up to BUSY_TIMEOUT_MS. Commits do not checkpoint the WAL here (`wal_autocheckpoint=0`):
    the worker does, from a connection's thread, every tick (`Database.checkpoint`), as do
    its connections' own commits past the usual threshold. With WAL and
    `synchronous=NORMAL` a commit writes to the WAL without syncing, so it does not wait
    either. For requests and the worker's short transactions (sequencing passes, webhook
    fan-out), whose statements are short; jobs working through large sets use threads.
    """

    def execute_now(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        """Run one statement here and now, returning its rows. Only inside a writing
        transaction, which holds the write lock: nothing can keep the statement waiting."""
        cursor = self._conn.execute(sql, parameters)
        try:
            return cursor.fetchall()
        finally:
            cursor.close()

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
        # Nothing was done: run it again where it may wait.
        return await super()._execute(_waiting, self._connection, fn, args, kwargs)


def _waiting(
    connection: sqlite3.Connection,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    try:
        return fn(*args, **kwargs)
    finally:
        connection.execute("PRAGMA busy_timeout=0")


async def _connect_inline(path: str) -> aiosqlite.Connection:
    def connector() -> sqlite3.Connection:
        # No busy wait here either: see _InlineSQLiteConnection.
        return sqlite3.connect(path, timeout=0, check_same_thread=False)

    connection = _InlineSQLiteConnection(connector, 64)
    connection._thread.daemon = True
    return await connection


# How long a SQLite connection waits for another's lock before failing.
BUSY_TIMEOUT_MS = 30_000


def _unicode_lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _configure_sqlite(engine: Engine, *, inline: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        if inline:  # see _InlineSQLiteConnection: nothing may wait on the loop's thread
            cursor.execute("PRAGMA busy_timeout=0")
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        else:
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()
        # SQLite's own lower() folds ASCII only ("É" stays "É"): searches that lower both
        # sides would never find Élodie. Python's folds every script, as PostgreSQL's does.
        dbapi_connection.create_function("lower", 1, _unicode_lower, deterministic=True)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers take the lock up front, so two transactions never deadlock upgrading a
        # read lock; read-only sessions ask for a deferred transaction instead.
        if connection.get_execution_options().get("sqlite_read_only"):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def advisory_xact_lock(session: Session, lock_id: int) -> None:
    """Hold a PostgreSQL advisory lock until the transaction ends (re-entrant within it).

    A no-op on SQLite, where a writing transaction already holds the database's write lock
    (BEGIN IMMEDIATE). Takes the sync session: call it from a session hook, or through
    `AsyncSession.run_sync`.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": lock_id})


def named_xact_lock(session: Session, *names: str) -> None:
    """`advisory_xact_lock` on each name's lock (64 bits of the name's SHA-256), in the
    order given: a caller taking several gives them in one order, so that none deadlock."""
    for name in names:
        digest = hashlib.sha256(name.encode()).digest()
        advisory_xact_lock(session, int.from_bytes(digest[:8], "big", signed=True))


@cache
def _locks_statement(count: int) -> TextClause:
    return text("SELECT " + ", ".join(f"pg_advisory_xact_lock(:lock{i})" for i in range(count)))


async def lock_key_slots(
    session: AsyncSession, namespace: str, keys: Iterable[str], slots: int
) -> None:
    """Hold, until the transaction ends, the locks of `keys` (PostgreSQL; a no-op on SQLite,
    as for `advisory_xact_lock`). Keys share `slots` locks per namespace, so that a batch
    holds at most that many; they are taken in one statement, in slot order, so that two
    writers taking several never deadlock."""
    if session.get_bind().dialect.name != "postgresql":
        return
    numbers = sorted(
        {int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % slots for key in keys}
    )
    if not numbers:
        return
    locks = {
        f"lock{i}": int.from_bytes(
            hashlib.sha256(f"{namespace}:{number}".encode()).digest()[:8], "big", signed=True
        )
        for i, number in enumerate(numbers)
    }
    await session.execute(_locks_statement(len(locks)), locks)


def try_advisory_xact_lock(session: Session, lock_id: int) -> bool:
    """`advisory_xact_lock` without waiting: False when another transaction holds it."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    taken = session.execute(text("SELECT pg_try_advisory_xact_lock(:lock)"), {"lock": lock_id})
    return bool(taken.scalar_one())


class Database:
    """Owns the engine and hands out sessions; one per application or command."""

    def __init__(
        self, url: str, *, pool_size: int = 10, session_info: Mapping[str, Any] | None = None
    ) -> None:
        """`session_info`: what every session starts with in its `info`; the application
        puts the audit chain's key there (`audit/chain.py`), for the sequencer to seal with."""
        self.url = url
        self.engine = create_engine(url, pool_size=pool_size)
        self.is_sqlite = url.startswith("sqlite")
        self.session_info: dict[str, Any] = dict(session_info or {})
        maker = partial(async_sessionmaker, expire_on_commit=False, info=self.session_info)
        self.sessionmaker = maker(self.engine)
        self.read_sessionmaker = self.sessionmaker
        # Requests' sessions: on SQLite their statements run inline (short ones, a request's).
        self.request_engine = self.engine
        self.request_sessionmaker = self.sessionmaker
        self.request_read_sessionmaker = self.sessionmaker
        if self.is_sqlite:
            self.read_sessionmaker = maker(self.engine.execution_options(sqlite_read_only=True))
            self.request_engine = create_engine(url, inline=True)
            self.request_sessionmaker = maker(self.request_engine)
            self.request_read_sessionmaker = maker(
                self.request_engine.execution_options(sqlite_read_only=True)
            )
        # SQLite has one writer at a time. Queueing this process's writers here, rather than
        # letting each connection poll the file lock (SQLite's busy handler sleeps between
        # tries), keeps the lock busy; other processes still wait through busy_timeout.
        self._sqlite_writer = asyncio.Lock()

    @asynccontextmanager
    async def writer_slot(self, *, read_only: bool) -> AsyncIterator[None]:
        """Hold while a writing transaction is open (a no-op except on SQLite)."""
        if read_only or not self.is_sqlite:
            yield
            return
        async with self._sqlite_writer:
            yield

    @asynccontextmanager
    async def transaction(
        self, *, read_only: bool = False, short: bool = False
    ) -> AsyncIterator[AsyncSession]:
        """One unit of work: commits when the block succeeds, rolls back when it raises.

        `short`: a few statements over bounded rows, as a request's; on SQLite they run on
        the event loop's thread (see `_InlineSQLiteConnection`) instead of each being
        handed to the connection's thread and back.
        """
        if short:
            maker = self.request_read_sessionmaker if read_only else self.request_sessionmaker
        else:
            maker = self.read_sessionmaker if read_only else self.sessionmaker
        async with self.writer_slot(read_only=read_only), maker() as session, session.begin():
            yield session

    async def checkpoint(self) -> tuple[int, int]:
        """SQLite: copy what the write-ahead log holds into the database file, as far as no
        reader still needs it (PASSIVE: waits for no one), from a connection's thread. The
        connections running on the event loop's thread never do it themselves (see
        `_InlineSQLiteConnection`); without it the log would grow while only they write.
        Returns the frames in the log and those now in the database; (0, 0) on PostgreSQL,
        where it does nothing."""
        if not self.is_sqlite:
            return (0, 0)
        async with self.engine.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            assert raw is not None
            # On the driver's connection: SQLAlchemy would begin a transaction first, and a
            # checkpoint cannot run inside one.
            cursor = await raw.execute("PRAGMA wal_checkpoint(PASSIVE)")
            _busy, frames, copied = await cursor.fetchone()
            await cursor.close()
        return (int(frames), int(copied))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.request_engine is not self.engine:
            await self.request_engine.dispose()
