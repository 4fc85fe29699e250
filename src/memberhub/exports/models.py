from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin, JSONType


class ExportFormat:
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"

    ALL = (CSV, JSONL, PARQUET)


class ExportMode:
    FULL = "full"
    INCREMENTAL = "incremental"

    ALL = (FULL, INCREMENTAL)


class RunStatus:
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"

    ALL = (QUEUED, RUNNING, COMPLETED, FAILED)
    ACTIVE = (QUEUED, RUNNING)


class Export(IdMixin, Base):
    """A table exported to a storage integration, on demand or on a cron schedule."""

    __tablename__ = "exports"
    __table_args__ = (
        # One export per table and storage target: their files share the table's folder.
        Index("uq_exports_storage_table", "storage_integration_id", "table_name", unique=True),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    table_name: Mapped[str] = mapped_column(String(40))
    format: Mapped[str] = mapped_column(String(10))
    mode: Mapped[str] = mapped_column(String(20))
    storage_integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="RESTRICT")
    )
    schedule: Mapped[str | None] = mapped_column(String(120))
    next_run_at: Mapped[datetime | None] = mapped_column(index=True)
    # Incremental: the highest key (row id; feed position for events) already exported.
    watermark: Mapped[int | None] = mapped_column(BigInteger)
    runs_started: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ExportRun(IdMixin, Base):
    """One run of an export: the key range it carries, fixed when it starts, and how far
    it got. A worker owns a running run for a lease; a dead worker's run is taken over and
    continues after its last recorded part."""

    __tablename__ = "export_runs"
    __table_args__ = (
        Index("ix_export_runs_export_sequence", "export_id", "sequence", unique=True),
        Index("ix_export_runs_status_id", "status", "id"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    export_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("exports.id", ondelete="CASCADE"))
    sequence: Mapped[int] = mapped_column(Integer)
    trigger: Mapped[str] = mapped_column(String(20))  # manual | schedule
    mode: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.QUEUED)
    # Rows with from < key <= to; `to` is set when the run starts (planned).
    watermark_from: Mapped[int | None] = mapped_column(BigInteger)
    watermark_to: Mapped[int | None] = mapped_column(BigInteger)
    # The last key written to a recorded part: where a resumed run continues.
    cursor: Mapped[int | None] = mapped_column(BigInteger)
    # Rows in the planned range when the run started (for progress).
    total_rows: Mapped[int | None] = mapped_column(BigInteger)
    # Attempts that stopped on an error (storage unreachable, …); the run fails after a few.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    parts: Mapped[int] = mapped_column(Integer, default=0)
    rows: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    manifest_key: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    lease_expires_at: Mapped[datetime | None] = mapped_column()


class ExportPart(IdMixin, Base):
    """A recorded slice of a run: its key range and the files it wrote (one per date)."""

    __tablename__ = "export_parts"
    __table_args__ = (Index("ix_export_parts_run_number", "run_id", "number", unique=True),)

    run_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("export_runs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    first_key: Mapped[int] = mapped_column(BigInteger)
    last_key: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    # [{"key": ..., "dt": "YYYY-MM-DD", "rows": n, "bytes": n}]
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
