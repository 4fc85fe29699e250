from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Base, BigIntId, IdMixin


class EventSink(IdMixin, Base):
    """A subscription of an analytics integration to the event feed.

    The sink follows the feed by position (`event_position`: every event up to it has
    been sent, skipped or refused), so it sees events in commit order and keeps its own
    pace: a sink whose vendor is down holds only its own position. `window_sent` lists the
    events of the window being sent that the vendor already took, so a retry after a
    partial failure sends only the rest. `replay_*` is a range of the feed being sent
    again on request, beside the live position.
    """

    __tablename__ = "event_sinks"

    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    event_types: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"types": [...]}
    # Our event type -> the vendor's event name; empty uses the provider's defaults.
    mapping: Mapped[dict[str, Any]] = mapped_column(default=dict)
    request_deletion: Mapped[bool] = mapped_column(Boolean, default=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    event_position: Mapped[int] = mapped_column(BigInteger, default=0)
    # Where the feed stood when the sink was made: a replay never reaches before it.
    start_position: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    window_sent: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"ids": [...]}
    replay_from: Mapped[int | None] = mapped_column(BigInteger)
    replay_to: Mapped[int | None] = mapped_column(BigInteger)
    replay_requested_at: Mapped[datetime | None] = mapped_column()
    # Health and the retry schedule.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    lease_until: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(String(1000))
    last_error_at: Mapped[datetime | None] = mapped_column()
    failing_since: Mapped[datetime | None] = mapped_column()
    last_success_at: Mapped[datetime | None] = mapped_column()
    # Running totals.
    events_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    events_skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    events_refused: Mapped[int] = mapped_column(BigInteger, default=0)
    requests_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    deletions_requested: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SinkDeliveryStatus:
    SUCCEEDED = "succeeded"
    # Some requests went through, then one failed: the rest is tried again.
    PARTIAL = "partial"
    FAILED = "failed"

    ALL = (SUCCEEDED, PARTIAL, FAILED)


class EventSinkDelivery(IdMixin, Base):
    """The delivery log: one attempt at one window of the feed (live or replayed)."""

    __tablename__ = "event_sink_deliveries"
    __table_args__ = (Index("ix_event_sink_deliveries_sink_id_id", "sink_id", "id"),)

    sink_id: Mapped[int] = mapped_column(BigIntId, ForeignKey("event_sinks.id", ondelete="CASCADE"))
    replay: Mapped[bool] = mapped_column(Boolean, default=False)
    first_position: Mapped[int] = mapped_column(BigInteger)
    last_position: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20))
    events_sent: Mapped[int] = mapped_column(Integer, default=0)
    events_skipped: Mapped[int] = mapped_column(Integer, default=0)
    events_refused: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    deletions: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(1000))
    started_at: Mapped[datetime] = mapped_column()
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
