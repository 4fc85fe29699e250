"""Opaque keyset cursors and the list envelope shared by every list endpoint."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from memberhub.kit.errors import ValidationFailed

T = TypeVar("T")

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
# The largest id either database can store (a signed 64-bit integer); a cursor past it would
# make the query fail in the driver instead of being rejected as invalid.
MAX_ID = 2**63 - 1


class Pagination(BaseModel):
    next_cursor: str | None
    has_more: bool


class Page(BaseModel, Generic[T]):
    data: list[T]
    pagination: Pagination


def encode_cursor(values: dict[str, Any]) -> str:
    raw = json.dumps(values, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ValidationFailed(
            "The cursor is not valid.", details={"field": "cursor"}, code="INVALID_CURSOR"
        ) from exc
    if not isinstance(value, dict):
        raise ValidationFailed(
            "The cursor is not valid.", details={"field": "cursor"}, code="INVALID_CURSOR"
        )
    return value


def cursor_after_id(cursor: str | None) -> int | None:
    """The row id a cursor points past, for lists ordered by ascending id."""
    if cursor is None:
        return None
    after = decode_cursor(cursor).get("after")
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= MAX_ID:
        raise ValidationFailed(
            "The cursor is not valid.", details={"field": "cursor"}, code="INVALID_CURSOR"
        )
    return after


class PageParams(BaseModel):
    limit: int
    cursor: str | None

    @property
    def after_id(self) -> int | None:
        return cursor_after_id(self.cursor)


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> PageParams:
    return PageParams(limit=limit, cursor=cursor)


def build_page(
    rows: Sequence[Any], limit: int, *, key: str = "id", feed: bool = False
) -> tuple[list[Any], Pagination]:
    """Rows were fetched with `limit + 1`; trim and produce the pagination block.

    A feed returns a cursor after its last row even on the last page, so a poller can
    resume there and receive only what came later.
    """
    has_more = len(rows) > limit
    items = list(rows[:limit])
    wants_cursor = has_more or feed
    next_cursor = (
        encode_cursor({"after": getattr(items[-1], key)}) if wants_cursor and items else None
    )
    return items, Pagination(next_cursor=next_cursor, has_more=has_more)
