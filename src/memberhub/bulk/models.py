from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class BulkOperation:
    AWARD = "award"
    MEMBER_IMPORT = "member_import"


class RowAction:
    """What a member import's row did (or, in a dry run, would do) to its member."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class BulkJobStatus:
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class RowOutcome:
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    FAILED = "failed"


class BulkJob(IdMixin, Base):
    """Rows uploaded as chunks, applied by the worker chunk by chunk: a bulk points award,
    or a member import."""

    __tablename__ = "bulk_jobs"
    __table_args__ = (Index("ix_bulk_jobs_operation", "operation", "id"),)

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    operation: Mapped[str] = mapped_column(String(20), default=BulkOperation.AWARD)
    # A member import's settings (match_by, organisation, plan, mapping).
    options: Mapped[dict[str, Any] | None] = mapped_column()
    # Every row is checked and its outcome recorded, then its changes are rolled back.
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(20), default=BulkJobStatus.QUEUED, index=True)
    total_rows: Mapped[int] = mapped_column(Integer, default=0)
    processed_rows: Mapped[int] = mapped_column(Integer, default=0)
    applied_rows: Mapped[int] = mapped_column(Integer, default=0)
    duplicate_rows: Mapped[int] = mapped_column(Integer, default=0)
    failed_rows: Mapped[int] = mapped_column(Integer, default=0)
    default_reason: Mapped[str | None] = mapped_column(String(1000))
    created_by: Mapped[str] = mapped_column(String(64))
    # The creating key's organisation: the job awards only to members that key can see.
    organisation_id: Mapped[int | None] = mapped_column(
        BigIntId, ForeignKey("organisations.id", ondelete="RESTRICT"), index=True
    )
    error: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # Workers claim a running job for a lease; a dead worker's job is picked up again.
    lease_expires_at: Mapped[datetime | None] = mapped_column()


class BulkJobChunk(IdMixin, Base):
    """A slice of the upload, as JSON lines (one row object per line)."""

    __tablename__ = "bulk_job_chunks"
    __table_args__ = (Index("ix_bulk_job_chunks_job_seq", "job_id", "sequence", unique=True),)

    job_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("bulk_jobs.id", ondelete="CASCADE"))
    sequence: Mapped[int] = mapped_column(Integer)
    first_row: Mapped[int] = mapped_column(Integer)
    row_count: Mapped[int] = mapped_column(Integer)
    rows: Mapped[str] = mapped_column(Text)
    processed_at: Mapped[datetime | None] = mapped_column()


class BulkJobRow(IdMixin, Base):
    """The outcome of one row."""

    __tablename__ = "bulk_job_rows"
    __table_args__ = (
        Index("ix_bulk_job_rows_job_row", "job_id", "row_number", unique=True),
        Index(
            "ix_bulk_job_rows_match_email",
            "job_id",
            "match_email",
            sqlite_where=text("match_email IS NOT NULL"),
            postgresql_where=text("match_email IS NOT NULL"),
        ),
        Index(
            "ix_bulk_job_rows_match_external",
            "job_id",
            "match_external",
            sqlite_where=text("match_external IS NOT NULL"),
            postgresql_where=text("match_external IS NOT NULL"),
        ),
    )

    job_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("bulk_jobs.id", ondelete="CASCADE"))
    row_number: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))
    member_id: Mapped[str | None] = mapped_column(String(320))
    points: Mapped[int | None] = mapped_column(BigInteger)
    reference_id: Mapped[str | None] = mapped_column(String(200))
    transaction_id: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(String(1000))
    # A member import's row: created, updated or unchanged (None when it failed).
    action: Mapped[str | None] = mapped_column(String(20))
    # A dry run's row: the member it names, by normalised email and by `SYSTEM:ID`, so that
    # a later chunk replays the earlier rows naming the same members (member_import.py).
    match_email: Mapped[str | None] = mapped_column(String(320))
    match_external: Mapped[str | None] = mapped_column(String(300))
