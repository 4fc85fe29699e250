"""Input types shared by request schemas: text no database will choke on, UTC times."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator, StringConstraints


def _no_control_chars(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("is out of the supported range") from exc


Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(_no_control_chars),
]
ShortText = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=200),
    AfterValidator(_no_control_chars),
]
LongText = Annotated[
    str,
    StringConstraints(max_length=1000),
    AfterValidator(_no_control_chars),
]
Code = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")]
UTCDatetime = Annotated[datetime, AfterValidator(_as_utc)]

# A path segment holding a public id; malformed ids are rejected before any lookup.
IdPath = Annotated[str, Path(pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$", max_length=45)]

# A free-text query parameter (filters, search).
SafeQuery = Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")]
