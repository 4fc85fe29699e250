"""The worker side of exports: queue scheduled runs, claim a run, plan it, write it part
by part, finish it.

Planning fixes the run's key range once, when it first starts: rows with
`watermark_from < key <= watermark_to`. The upper end is the highest key committed, and
on PostgreSQL the plan waits until every transaction that was writing to the table when
that key was read has ended: ids come from a sequence when a row is inserted, not when it
commits, so a transaction holding a lower id may still commit after a higher one is
visible. Every transaction inserting into a table holds its RowExclusiveLock from before
it draws an id until it ends, so once the holders seen after reading the highest id are
gone, no row with a lower id can appear any more. (Events are keyed by their feed
position, which the sequencer assigns in commit order: nothing to wait for.) On SQLite
writers commit one at a time in id order.

Incremental runs start from the export's watermark, the previous run's upper end, so
consecutive runs carry each committed row exactly once. Rows are read in key order, a page
per short read transaction (keyset pagination), and written into a part's local files (one
per partition date); memory holds one page. When a part is complete its files are uploaded
and the part recorded, with the run's cursor, in one transaction. A run taken over from a
dead worker continues after its last recorded part; a part that was being written when the
worker died is written again under the same keys, replacing what reached the store.

Completion writes the manifest, then in one transaction marks the run completed, moves
the watermark and emits `export.completed`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.catalog import ExportCompleted
from memberhub.events.service import emit
from memberhub.exports import schedule
from memberhub.exports.models import Export, ExportMode, ExportPart, ExportRun, RunStatus
from memberhub.exports.repository import ExportRepository
from memberhub.exports.service import queue_run
from memberhub.exports.tables import (
    TABLES,
    ExportTable,
    arrow_schema,
    fetch_page,
    json_columns,
    page_query,
    schema_out,
    to_record_batch,
)
from memberhub.exports.writers import CONTENT_TYPES, PartWriter
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_storage, get_provider
from memberhub.integrations.providers.base import Connection, ObjectStorage
from memberhub.kit.db import Database
from memberhub.program.service import get_program

log = structlog.get_logger("memberhub.exports")

MANIFEST_VERSION = 1
MAX_FAILURES = 5
ERROR_CHARS = 1000
# How long a plan waits for transactions writing to the table before trying again later.
IN_FLIGHT_WAIT_SECONDS = 10.0
IN_FLIGHT_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ExportConfig:
    part_rows: int = 250_000  # rows per part (a file per date per part)
    page_rows: int = 10_000  # rows read per query, and per Parquet row group
    lease: timedelta = timedelta(seconds=120)
    time_budget: timedelta = timedelta(seconds=60)
    temp_dir: Path | None = None


class RunLost(Exception):
    """Another worker owns the run now (this one's lease ran out)."""


class NotYetSafe(Exception):
    """Transactions writing to the table have not ended yet; plan again later."""


def data_key(table: str, dt: str, sequence: int, part: int, export_format: str) -> str:
    return f"{table}/dt={dt}/part-{sequence:06d}-{part:05d}.{export_format}"


def manifest_key(table: str, sequence: int) -> str:
    # Under a folder starting with "_", which Hive-style readers skip.
    return f"{table}/_manifests/run-{sequence:06d}.json"


async def process_exports(
    db: Database, hub: IntegrationHub, now: datetime, config: ExportConfig | None = None
) -> int:
    """Queue the scheduled runs that came due, then work on runs until the time budget is
    spent; returns the rows exported."""
    config = config or ExportConfig()
    started = time.monotonic()

    def clock() -> datetime:
        return now + timedelta(seconds=time.monotonic() - started)

    await queue_scheduled_runs(db, now)
    exported = 0
    while clock() - now < config.time_budget:
        async with db.transaction() as session:
            claimed = await _claim(session, clock(), config)
        if claimed is None:
            break
        run_id, lease = claimed
        try:
            rows, finished = await _work(db, hub, run_id, lease, clock, now, config)
        except RunLost:
            log.warning("export_run_lost", run_id=run_id)
            continue
        exported += rows
        if not finished:
            break
    return exported


async def queue_scheduled_runs(db: Database, now: datetime) -> int:
    queued = 0
    async with db.transaction() as session:
        due = await ExportRepository(session).due_exports(now, limit=100)
        if not due:
            return 0
        program = await get_program(session)
        repository = ExportRepository(session)
        for export in due:
            assert export.schedule is not None
            export.next_run_at = schedule.next_run(export.schedule, now, program.timezone)
            # A run still going when the next occasion comes: that occasion is skipped.
            if await repository.active_run(export.id) is None:
                queue_run(session, export, trigger="schedule", now=now)
                queued += 1
    return queued


async def _claim(
    session: AsyncSession, now: datetime, config: ExportConfig
) -> tuple[int, datetime] | None:
    run = await ExportRepository(session).claim_next_run(now)
    if run is None:
        return None
    lease = now + config.lease
    run.status = RunStatus.RUNNING
    run.lease_expires_at = lease
    run.started_at = run.started_at or now
    return run.id, lease


async def _locked_run(session: AsyncSession, run_id: int, lease: datetime) -> ExportRun:
    run = await ExportRepository(session).lock_run(run_id)
    if run is None or run.status != RunStatus.RUNNING or run.lease_expires_at != lease:
        raise RunLost(run_id)
    return run


@dataclass
class _Context:
    run: ExportRun
    export: Export
    spec: ExportTable
    storage: ObjectStorage
    connection: Connection
    storage_public_id: str


async def _context(db: Database, hub: IntegrationHub, run_id: int) -> _Context:
    async with db.transaction(read_only=True) as session:
        run = await session.get(ExportRun, run_id)
        assert run is not None
        export = await session.get(Export, run.export_id)
        assert export is not None
        integration = await session.get(Integration, export.storage_integration_id)
        assert integration is not None
    provider = get_provider(integration.provider)
    storage = as_storage(provider) if provider is not None else None
    if storage is None:
        raise RuntimeError(f"{integration.provider} is not a storage provider")
    if not integration.enabled:
        raise RuntimeError(f"the storage integration {integration.public_id} is disabled")
    if integration.organisation_id is not None:
        raise RuntimeError(
            f"the storage integration {integration.public_id} is an organisation's: every "
            "organisation's rows go only to an installation-wide target"
        )
    return _Context(
        run=run,
        export=export,
        spec=TABLES[export.table_name],
        storage=storage,
        connection=hub.connection(integration),
        storage_public_id=integration.public_id,
    )


async def _work(
    db: Database,
    hub: IntegrationHub,
    run_id: int,
    lease: datetime,
    clock: Any,
    began: datetime,
    config: ExportConfig,
) -> tuple[int, bool]:
    """Plan the run if new, then write parts until it is done or the time budget is
    spent; (rows written, whether the run finished)."""
    rows = 0
    context: _Context | None = None
    try:
        context = await _context(db, hub, run_id)
        if context.run.watermark_to is None:
            lease = await _plan(db, context, lease, clock(), config)
        while True:
            if context.run.cursor is not None and context.run.cursor >= (
                context.run.watermark_to or 0
            ):
                await _finish(db, context, lease, clock())
                return rows, True
            if context.run.watermark_to is None or context.run.total_rows == 0:
                await _finish(db, context, lease, clock())
                return rows, True
            written, lease, done = await _write_part(db, context, lease, clock, config)
            rows += written
            if done:
                await _finish(db, context, lease, clock())
                return rows, True
            if clock() - began >= config.time_budget:
                await _release(db, run_id, lease)
                return rows, False
    except (RunLost, NotYetSafe) as exc:
        if isinstance(exc, NotYetSafe):
            await _release(db, run_id, lease)
            return rows, False
        raise
    except Exception as exc:
        failed_for_good = await _fail_attempt(db, run_id, lease, exc, clock())
        log.warning("export_run_failed", run_id=run_id, error_type=type(exc).__name__)
        if failed_for_good and context is not None:
            await _remove_files(db, context, context.run)
        return rows, False


async def _plan(
    db: Database, context: _Context, lease: datetime, now: datetime, config: ExportConfig
) -> datetime:
    run, export, spec = context.run, context.export, context.spec
    after = export.watermark if run.mode == ExportMode.INCREMENTAL else None
    async with db.transaction(read_only=True) as session:
        repository = ExportRepository(session)
        highest = await repository.highest_key(spec)
        in_flight = (
            await repository.writers_in_flight(spec)
            if not db.is_sqlite and spec.key == "id"
            else []
        )
    if in_flight:
        await _wait_for(db, in_flight)
    async with db.transaction(read_only=True) as session:
        # Counted now that every row up to `highest` is committed.
        total = await ExportRepository(session).count_range(spec, after, highest)
    upper = highest if highest is not None else (after or 0)
    if after is not None and upper < after:
        upper = after  # rows were deleted: nothing new
    async with db.transaction() as session:
        locked = await _locked_run(session, run.id, lease)
        locked.watermark_from = after
        locked.watermark_to = upper
        locked.cursor = after
        locked.total_rows = total
        lease = now + config.lease
        locked.lease_expires_at = lease
        context.run = locked
    return lease


async def _wait_for(db: Database, virtual_ids: list[str]) -> None:
    deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
    while True:
        async with db.transaction(read_only=True) as session:
            if await ExportRepository(session).still_running(virtual_ids) == 0:
                return
        if time.monotonic() >= deadline:
            raise NotYetSafe()
        await asyncio.sleep(IN_FLIGHT_POLL_SECONDS)


async def _write_part(
    db: Database, context: _Context, lease: datetime, clock: Any, config: ExportConfig
) -> tuple[int, datetime, bool]:
    """Write the next part; (rows, renewed lease, whether the range is exhausted)."""
    run, export, spec = context.run, context.export, context.spec
    assert run.watermark_to is not None
    schema = arrow_schema(spec)
    number = run.parts + 1
    cursor = run.cursor
    first_key: int | None = None
    written = 0
    directory = Path(tempfile.mkdtemp(prefix="memberhub-export-", dir=config.temp_dir))
    try:
        writer = PartWriter(directory, export.format, schema, spec.partition, json_columns(spec))
        exhausted = False
        while written < config.part_rows:
            limit = min(config.page_rows, config.part_rows - written)
            async with db.transaction(read_only=True) as session:
                page = await fetch_page(
                    session,
                    page_query(
                        spec, sqlite=db.is_sqlite, after=cursor, upto=run.watermark_to, limit=limit
                    ),
                )
            if page:
                writer.write(to_record_batch(spec, schema, page))
                written += len(page)
                if first_key is None:
                    first_key = int(page[0][0])
                cursor = int(page[-1][0])
            if len(page) < limit:
                exhausted = True
                break
        files = writer.close()
        stored: list[dict[str, Any]] = []
        for file in files:
            key = data_key(spec.name, file.dt, run.sequence, number, export.format)
            result_object = await context.storage.upload_file(
                context.connection, key, file.path, content_type=CONTENT_TYPES[export.format]
            )
            stored.append(
                {"key": key, "dt": file.dt, "rows": file.rows, "bytes": result_object.size}
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if cursor is not None and cursor >= run.watermark_to:
        exhausted = True
    if not stored:
        return 0, lease, True
    size = sum(int(f["bytes"]) for f in stored)
    async with db.transaction() as session:
        locked = await _locked_run(session, run.id, lease)
        session.add(
            ExportPart(
                run_id=locked.id,
                number=number,
                first_key=first_key or 0,
                last_key=cursor or 0,
                rows=written,
                bytes=size,
                files=stored,
                created_at=clock(),
            )
        )
        locked.parts = number
        locked.cursor = cursor
        locked.rows += written
        locked.bytes += size
        locked.error = None
        lease = clock() + config.lease
        locked.lease_expires_at = lease
        context.run = locked
    return written, lease, exhausted


async def _finish(db: Database, context: _Context, lease: datetime, now: datetime) -> None:
    run, export, spec = context.run, context.export, context.spec
    async with db.transaction(read_only=True) as session:
        parts = list(await ExportRepository(session).parts(run.id))
    files = [file for part in parts for file in part.files]
    key = manifest_key(spec.name, run.sequence)
    manifest = {
        "version": MANIFEST_VERSION,
        "export_id": export.public_id,
        "run_id": run.public_id,
        "sequence": run.sequence,
        "table": spec.name,
        "format": export.format,
        "mode": run.mode,
        "watermark": {"key": spec.key, "from": run.watermark_from, "to": run.watermark_to},
        "partition": {"column": spec.partition, "name": "dt", "timezone": "UTC"},
        "rows": sum(int(f["rows"]) for f in files),
        "bytes": sum(int(f["bytes"]) for f in files),
        "files": files,
        "schema": schema_out(spec),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": now.isoformat(),
    }
    directory = Path(tempfile.mkdtemp(prefix="memberhub-manifest-"))
    try:
        path = directory / "manifest.json"
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        await context.storage.upload_file(
            context.connection, key, path, content_type="application/json"
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    async with db.transaction() as session:
        locked = await _locked_run(session, run.id, lease)
        locked.status = RunStatus.COMPLETED
        locked.finished_at = now
        locked.manifest_key = key
        locked.lease_expires_at = None
        locked.error = None
        locked_export = await ExportRepository(session).lock_export(export.id)
        assert locked_export is not None
        if run.mode == ExportMode.INCREMENTAL:
            locked_export.watermark = locked.watermark_to
        locked_export.updated_at = now
        emit(
            session,
            ExportCompleted(
                export_id=export.public_id,
                run_id=run.public_id,
                sequence=run.sequence,
                table=spec.name,
                format=export.format,
                mode=run.mode,
                storage_integration_id=context.storage_public_id,
                rows=locked.rows,
                bytes=locked.bytes,
                files=len(files),
                manifest_key=key,
                watermark_from=locked.watermark_from,
                watermark_to=locked.watermark_to,
                finished_at=now,
            ),
            occurred_at=now,
        )
        earlier = (
            await ExportRepository(session).earlier_full_runs(export.id, run.sequence)
            if run.mode == ExportMode.FULL
            else []
        )
        superseded: list[str] = []
        for previous in earlier:
            for part in await ExportRepository(session).parts(previous.id):
                superseded.extend(str(f["key"]) for f in part.files)
    # A full run replaces the previous full runs' files (and a failed one's, should their
    # removal have failed too): the folder holds the table once.
    await _delete_objects(context, superseded)


async def _remove_files(db: Database, context: _Context, run: ExportRun) -> None:
    """A run failed for good: the parts (and a manifest) it uploaded are removed, so the
    folder holds no rows the next run writes again. Best effort: what cannot be removed
    now is removed by the next full run."""
    async with db.transaction(read_only=True) as session:
        parts = await ExportRepository(session).parts(run.id)
    keys = [str(f["key"]) for part in parts for f in part.files]
    await _delete_objects(context, [*keys, manifest_key(context.spec.name, run.sequence)])


async def _delete_objects(context: _Context, keys: list[str]) -> None:
    for stale in keys:
        try:
            await context.storage.delete_object(context.connection, stale)
        except Exception:
            log.warning("export_stale_file_kept", key=stale)


async def _release(db: Database, run_id: int, lease: datetime) -> None:
    async with db.transaction() as session:
        try:
            run = await _locked_run(session, run_id, lease)
        except RunLost:
            return
        run.lease_expires_at = None


async def _fail_attempt(
    db: Database, run_id: int, lease: datetime, exc: Exception, now: datetime
) -> bool:
    """An attempt stopped on an error: try again next time, or fail after a few. True
    when the run failed for good."""
    message = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
    async with db.transaction() as session:
        try:
            run = await _locked_run(session, run_id, lease)
        except RunLost:
            return False
        run.failures += 1
        run.error = message
        run.lease_expires_at = None
        if run.failures >= MAX_FAILURES:
            run.status = RunStatus.FAILED
            run.finished_at = now
            return True
        return False
