from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class CrmLink(IdMixin, Base):
    """One member or lead as one CRM integration knows it.

    `synced` holds, per CRM property, the last value both sides agreed on: a side whose
    value differs from it has changed. `written` holds hashes of the values we wrote, until
    `written_until`, so that the CRM sending them back is recognised as an echo. A link with
    `pending_at` set has changes not yet sent.
    """

    __tablename__ = "crm_links"
    __table_args__ = (
        Index("uq_crm_links_entity", "integration_id", "entity_type", "entity_id", unique=True),
        Index("ix_crm_links_external", "integration_id", "external_id"),
        Index("ix_crm_links_pending", "integration_id", "pending_at"),
    )

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    entity_type: Mapped[str] = mapped_column(String(10))  # members | leads
    entity_id: Mapped[int] = mapped_column(BigIntId)
    external_id: Mapped[str | None] = mapped_column(String(100))
    synced: Mapped[dict[str, Any]] = mapped_column(default=dict)
    written: Mapped[dict[str, Any]] = mapped_column(default=dict)
    written_until: Mapped[datetime | None] = mapped_column()
    # Properties under manual review ({property: conflict id}): not written until resolved.
    held: Mapped[dict[str, Any]] = mapped_column(default=dict)
    remote_modified_at: Mapped[datetime | None] = mapped_column()
    pending_since: Mapped[datetime | None] = mapped_column()
    pending_at: Mapped[datetime | None] = mapped_column()
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(String(1000))
    synced_at: Mapped[datetime | None] = mapped_column()


class CrmSyncState(Base):
    """Where an integration's sync stands: the last event read, the pull watermarks and
    which run holds it."""

    __tablename__ = "crm_sync_states"

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE"), primary_key=True
    )
    event_position: Mapped[int | None] = mapped_column(BigInteger)
    # Per CRM object: the latest change taken, ISO 8601.
    watermarks: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_pull_at: Mapped[datetime | None] = mapped_column()
    last_full_push_at: Mapped[datetime | None] = mapped_column()
    active_run_id: Mapped[int | None] = mapped_column(BigIntId)
    lease_until: Mapped[datetime | None] = mapped_column()


class RunStatus:
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class SyncRun(IdMixin, Base):
    __tablename__ = "crm_sync_runs"
    __table_args__ = (
        Index("ix_crm_sync_runs_integration", "integration_id", "id"),
        Index("ix_crm_sync_runs_status", "status"),
    )

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    mode: Mapped[str] = mapped_column(String(10))  # push | pull
    # manual (the API), schedule (full push, pull), changes (the push of recent changes)
    trigger: Mapped[str] = mapped_column(String(10))
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(10), default=RunStatus.QUEUED)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    conflicts: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    cursor_before: Mapped[dict[str, Any]] = mapped_column(default=dict)
    cursor_after: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(String(1000))
    requested_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class SyncRunRecord(IdMixin, Base):
    """What a run did to one record: created, updated, failed or held for review (records
    with nothing to do are only counted)."""

    __tablename__ = "crm_sync_run_records"
    __table_args__ = (Index("ix_crm_sync_run_records_run", "run_id", "id"),)

    run_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("crm_sync_runs.id", ondelete="CASCADE")
    )
    entity_type: Mapped[str | None] = mapped_column(String(10))
    entity_public_id: Mapped[str | None] = mapped_column(String(32))
    external_id: Mapped[str | None] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(10))
    changes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(String(1000))


class ConflictStatus:
    OPEN = "open"
    RESOLVED = "resolved"


class CrmConflict(IdMixin, Base):
    """A field changed on both sides under the manual-review policy."""

    __tablename__ = "crm_conflicts"
    __table_args__ = (Index("ix_crm_conflicts_integration_status", "integration_id", "status"),)

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE")
    )
    link_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("crm_links.id", ondelete="CASCADE"))
    entity_type: Mapped[str] = mapped_column(String(10))
    entity_public_id: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str | None] = mapped_column(String(100))
    field: Mapped[str] = mapped_column(String(80))
    property: Mapped[str] = mapped_column(String(100))
    # {"memberhub": our value as the CRM would get it, "crm": the CRM's value}
    values: Mapped[dict[str, Any]] = mapped_column()
    crm_modified_at: Mapped[datetime | None] = mapped_column()
    status: Mapped[str] = mapped_column(String(10), default=ConflictStatus.OPEN)
    resolution: Mapped[str | None] = mapped_column(String(10))
    resolved_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column()
