"""Cron schedules, read in the program's time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

MAX_FIELDS = 5


def validated(expression: str) -> str:
    """The expression, normalised; ValueError unless it is a five-field cron expression."""
    normalised = " ".join(expression.split())
    if len(normalised.split(" ")) != MAX_FIELDS or not croniter.is_valid(normalised):
        raise ValueError(
            f"{expression!r} is not a cron expression of five fields (minute hour "
            "day-of-month month day-of-week)"
        )
    try:
        croniter(normalised, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(
            f"{expression!r} names no date that exists (such as 30 February)"
        ) from None
    return normalised


def next_run(expression: str, after: datetime, timezone: str) -> datetime:
    """The first time after `after` the expression names, in `timezone`; returned in UTC."""
    local = after.astimezone(ZoneInfo(timezone))
    following = croniter(expression, local).get_next(datetime)
    assert isinstance(following, datetime)
    return following.astimezone(UTC)
