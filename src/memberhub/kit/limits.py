"""Rate limits in `limits` notation ("100/minute", "190/10 seconds"), read the same way by
every setting that takes one."""

from __future__ import annotations

import limits


def parse_rate_limit(notation: str) -> limits.RateLimitItem:
    """`notation` as a limit that lets something through: ValueError for what `limits`
    cannot read, and for an amount below one (that would refuse every call for ever;
    revoking or disabling says so plainly)."""
    item = limits.parse(notation)
    if item.amount < 1:
        raise ValueError(f"{notation!r} allows no request at all")
    return item
