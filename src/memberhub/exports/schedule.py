"""Cron schedules, read in the program's time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

MAX_FIELDS = 5
MAX_CLOCK_CHANGE = timedelta(hours=2)


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
    """The first time after `after` the expression names on the wall clock of `timezone`;
    returned in UTC. Across daylight saving, as cron does: when the clocks go back, a
    schedule with a fixed hour runs once, at the first pass of the repeated time, and one
    whose hour is `*` runs in both passes; a time the clocks skip (they go forward) runs
    when they have moved on, as far past the change as it was meant to be."""
    zone = ZoneInfo(timezone)
    every_hour = expression.split(" ")[1].startswith("*")
    # A wall time up to a clock change before `after`'s may still come after it.
    start = (after.astimezone(zone).replace(tzinfo=None)) - MAX_CLOCK_CHANGE
    occasions = croniter(expression, start)
    best: datetime | None = None
    while True:
        wall = occasions.get_next(datetime)
        assert isinstance(wall, datetime)
        first = wall.replace(tzinfo=zone).astimezone(UTC)
        times = [first]
        if every_hour:
            second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
            if second != first and second.astimezone(zone).replace(tzinfo=None) == wall:
                times.append(second)  # the repeated time's second pass
        for at in times:
            if at > after and (best is None or at < best):
                best = at
        # Later wall times come later in UTC too, give or take one clock change.
        if best is not None and first - MAX_CLOCK_CHANGE > best:
            return best
