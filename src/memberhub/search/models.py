from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from memberhub.kit.db import Base, BigIntId


class SearchSyncState(Base):
    """Where a search-index integration stands: the last feed position whose changes are in
    the index, whether a full reindex is wanted, and how the last attempts went.

    `settings_fingerprint` is a hash of the integration's index settings when the index was
    last rebuilt: settings that differ (another index, other member fields) ask for a
    rebuild. `lease_until` keeps a second worker off an integration being synced.
    """

    __tablename__ = "search_sync_states"

    integration_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("integrations.id", ondelete="CASCADE"), primary_key=True
    )
    event_position: Mapped[int] = mapped_column(BigInteger, default=0)
    settings_fingerprint: Mapped[str | None] = mapped_column(String(64))
    reindex_requested_at: Mapped[datetime | None] = mapped_column()
    last_reindex_at: Mapped[datetime | None] = mapped_column()
    last_synced_at: Mapped[datetime | None] = mapped_column()
    records_saved: Mapped[int] = mapped_column(BigInteger, default=0)
    records_deleted: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(1000))
    last_error_at: Mapped[datetime | None] = mapped_column()
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    lease_until: Mapped[datetime | None] = mapped_column()
