"""Idempotency-Key handling for POST requests.

The first successful response is stored in the same transaction as the change it made, so a
replay can never observe the change without the response or the response without the change.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import IO

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from memberhub.idempotency.models import IdempotencyRecord
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import named_xact_lock

REPLAYED_HEADERS = ("content-type", "etag", "location")
MAX_KEY_LENGTH = 255
FINGERPRINT_BLOCK_BYTES = 64 * 1024


@dataclass(frozen=True)
class PendingKey:
    api_key_id: int
    key: str
    fingerprint: str


class IdempotentReplay(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__("replay")
        self.response = response


def canonical_body(body: bytes | IO[bytes], content_type: str | None) -> bytes | IO[bytes]:
    """A JSON body as its content (keys sorted, no spacing), so that a client that writes the
    same request again with its fields in another order or spaced otherwise is the same
    request; any other body (or JSON that does not parse) as its bytes."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if not isinstance(body, bytes) or not (
        media_type == "application/json" or media_type.endswith("+json")
    ):
        return body
    try:
        content = json.loads(body)
        # A lone surrogate ("\ud800") parses but has no UTF-8 form: such a body is taken as
        # its bytes (validation refuses it later).
        return json.dumps(
            content, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except ValueError:
        return body


def fingerprint(method: str, path: str, query: str, body: bytes | IO[bytes]) -> str:
    """One digest of the request; a body in a file (an upload) is read a block at a time
    and gives the digest its bytes would."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    if isinstance(body, bytes):
        digest.update(len(body).to_bytes(8, "big"))
        digest.update(body)
    else:
        body.seek(0, os.SEEK_END)
        digest.update(body.tell().to_bytes(8, "big"))
        body.seek(0)
        while block := body.read(FINGERPRINT_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


async def lock(session: AsyncSession, api_key_id: int, key: str) -> None:
    """Serialise requests carrying the same key until the first one's transaction ends.

    Without it, concurrent retries on PostgreSQL all miss the not yet committed record, run
    the operation, and fail on its side effects (409) instead of replaying the first response.
    """
    await session.run_sync(named_xact_lock, f"{api_key_id}:{key}")


async def find(session: AsyncSession, api_key_id: int, key: str) -> IdempotencyRecord | None:
    return await session.scalar(
        select(IdempotencyRecord).where(
            IdempotencyRecord.api_key_id == api_key_id,
            IdempotencyRecord.key == key,
            IdempotencyRecord.expires_at > utcnow(),
        )
    )


def replay(record: IdempotencyRecord, box: SecretBox) -> Response:
    headers = json.loads(record.response_headers)
    headers["idempotent-replayed"] = "true"
    body = box.open(record.response_body)
    return Response(content=body, status_code=record.status_code, headers=headers)


async def store(
    session: AsyncSession,
    pending: PendingKey,
    response: Response,
    *,
    ttl_hours: int,
    box: SecretBox,
) -> None:
    """Keep the response for replays, sealed: some carry secrets shown only once (a new
    API key, a webhook signing secret)."""
    now = utcnow()
    # An expired record for the same key would block the insert; it has served its time.
    await session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.api_key_id == pending.api_key_id,
            IdempotencyRecord.key == pending.key,
            IdempotencyRecord.expires_at <= now,
        )
    )
    headers = {k: v for k, v in response.headers.items() if k.lower() in REPLAYED_HEADERS}
    session.add(
        IdempotencyRecord(
            api_key_id=pending.api_key_id,
            key=pending.key,
            request_fingerprint=pending.fingerprint,
            status_code=response.status_code,
            response_body=box.seal(bytes(response.body)),
            response_headers=json.dumps(headers),
            created_at=now,
            expires_at=now + timedelta(hours=ttl_hours),
        )
    )
    await session.flush()


async def purge_expired(session: AsyncSession) -> int:
    result = await session.execute(
        delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)
