"""Fixtures for the member tests: direct row edits for fields no API sets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import update

from memberhub.kit.db import Database
from memberhub.members.models import Member

SetMemberColumns = Callable[..., Awaitable[None]]


@pytest.fixture
def set_member_columns(db: Database) -> SetMemberColumns:
    """`await set_member_columns("mem_…", tier="gold", created_at=...)` writes the row."""

    async def _set(public_id: str, **values: Any) -> None:
        async with db.transaction() as session:
            result = await session.execute(
                update(Member).where(Member.public_id == public_id).values(**values)
            )
            assert result.rowcount == 1  # type: ignore[attr-defined]

    return _set
