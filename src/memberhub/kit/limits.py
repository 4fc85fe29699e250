"""Rate limits in `limits` notation ("100/minute", "190/10 seconds"), read the same way by
every setting that takes one."""

from __future__ import annotations

import re

import limits

_NO_TIME = re.compile(r"(?:/|\bper\b)\s*0+\s*[a-z]", re.IGNORECASE)


def parse_rate_limit(notation: str) -> limits.RateLimitItem:
    """`notation` as a limit that lets something through: ValueError for what `limits`
    cannot read, and for an amount below one (that would refuse every call for ever;
    revoking or disabling says so plainly)."""
    items = limits.parse_many(notation)
    if len(items) != 1:
        # Only one is enforced: a second would be shown and never applied.
        raise ValueError(f"{notation!r} holds {len(items)} limits; give one, like '100/minute'")
    (item,) = items
    if item.amount < 1:
        raise ValueError(f"{notation!r} allows no request at all")
    if _NO_TIME.search(notation):  # read by `limits` as one unit, not as written
        raise ValueError(f"{notation!r} has a window of no time")
    return item
