from __future__ import annotations

from sqlalchemy import select

from memberhub.idempotency.models import IdempotencyRecord
from memberhub.kit.db import Database
from tests.support import ApiClient


async def test_a_replayed_secret_is_kept_sealed_and_returned_again(
    api: ApiClient, db: Database
) -> None:
    body = {"url": "https://93.184.215.14/hooks", "event_types": ["*"]}
    headers = {"Idempotency-Key": "create-hook-1"}

    first = await api.post("/api/v1/webhook-endpoints", body, headers=headers)
    again = await api.post("/api/v1/webhook-endpoints", body, headers=headers)

    assert first.status_code == again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    secret = first.json()["secret"]
    assert again.json() == first.json()
    async with db.transaction() as session:
        [stored] = (await session.scalars(select(IdempotencyRecord.response_body))).all()
    assert secret.encode() not in stored
    assert first.json()["id"].encode() not in stored
    listed = (await api.get("/api/v1/webhook-endpoints")).json()["data"]
    assert len(listed) == 1
