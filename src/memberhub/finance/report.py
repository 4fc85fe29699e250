"""A reconciliation report's mismatches as they are found: each gets the next id
(`mm_1`, `mm_2`, …), its kind, a description, and its fix — the name of what the API can
apply, and `_fix`, what applying it needs (kept in the report, never shown)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from memberhub.integrations.providers.base import MoneyRecord


class MismatchList:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self, kind: str, description: str, fix: str | None, fix_description: str, **fields: Any
    ) -> None:
        self.rows.append(
            {
                "id": f"mm_{len(self.rows) + 1}",
                "kind": kind,
                "description": description,
                "fix": fix,
                "fix_description": fix_description,
                **fields,
            }
        )


def money(amount: int, currency: str) -> str:
    return f"{amount} {currency} (minor units)"


def local_day(moment: datetime, zone: tzinfo) -> date:
    """The date of `moment` on the calendar of `zone` (the program's): how documents in
    the books are dated."""
    return moment.astimezone(zone).date()


def issued_in(day: date, start: datetime, end: datetime, zone: tzinfo) -> bool:
    """Whether a document dated `day` (on the program's calendar) falls in [start, end)."""
    return local_day(start, zone) <= day <= local_day(end - timedelta(microseconds=1), zone)


def record_of(
    movement: MoneyRecord, records: Mapping[str, tuple[str, int]]
) -> tuple[str, int] | None:
    """(payment key, member row id) of the payment a Stripe movement is about, found by any
    of its ids; None for a payment memberhub never applied."""
    return next((records[i] for i in (movement.id, *movement.references) if i in records), None)
