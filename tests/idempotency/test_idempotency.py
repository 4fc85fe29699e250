"""Idempotency-Key on POST: a retried request returns the first response and does nothing
twice; keys belong to one API key; failures are not remembered."""

from __future__ import annotations

import asyncio
import io
from typing import Any

from sqlalchemy import func, select

from memberhub.audit.models import AuditEntry
from memberhub.auth.roles import Role
from memberhub.events.models import Event
from memberhub.idempotency import service as idempotency
from memberhub.kit.db import Database
from memberhub.members.models import Member
from tests.conftest import issue_key
from tests.support import ApiClient

MEMBERS = "/api/v1/members"


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def count_rows(db: Database, model: Any, *conditions: Any) -> int:
    async with db.transaction(read_only=True) as session:
        total = await session.scalar(select(func.count()).select_from(model).where(*conditions))
    return int(total or 0)


async def member_created_events(api: ApiClient) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/events", params={"type": "member.created"})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def test_same_key_and_body_replays_the_first_response_and_creates_once(
    db: Database, api: ApiClient
) -> None:
    body = {"email": "ana@example.com", "first_name": "Ana"}

    first = await api.post(MEMBERS, body, headers=keyed("create-ana-1"))
    second = await api.post(MEMBERS, body, headers=keyed("create-ana-1"))

    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    assert second.status_code == 201, second.text
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]
    assert second.headers["etag"] == first.headers["etag"]
    # A replay still counts against the key's limit and says so.
    remaining = int(first.headers["ratelimit-remaining"])
    assert int(second.headers["ratelimit-remaining"]) == remaining - 1

    member_id = first.json()["id"]
    listed = (await api.get(MEMBERS)).json()["data"]
    assert [m["id"] for m in listed] == [member_id]
    events = await member_created_events(api)
    assert [e["member_id"] for e in events] == [member_id]
    audit = (await api.get("/api/v1/audit", params={"action": "member.create"})).json()["data"]
    assert [a["object_id"] for a in audit] == [member_id]


async def test_replay_still_returns_the_original_after_the_object_changed(
    api: ApiClient,
) -> None:
    body = {"email": "bo@example.com", "first_name": "Bo"}
    first = await api.post(MEMBERS, body, headers=keyed("create-bo"))
    member_id = first.json()["id"]
    patched = await api.patch(f"{MEMBERS}/{member_id}", {"first_name": "Bob"})
    assert patched.status_code == 200

    replayed = await api.post(MEMBERS, body, headers=keyed("create-bo"))

    assert replayed.status_code == 201
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == first.json()
    assert len((await api.get(MEMBERS)).json()["data"]) == 1


async def test_same_key_with_a_different_body_is_422_idempotency_key_reused(
    db: Database, api: ApiClient
) -> None:
    first = await api.post(MEMBERS, {"email": "cy@example.com"}, headers=keyed("k-reuse"))
    assert first.status_code == 201

    reused = await api.post(MEMBERS, {"email": "other@example.com"}, headers=keyed("k-reuse"))

    assert reused.status_code == 422, reused.text
    error = reused.json()["error"]
    assert error["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert isinstance(error["details"], dict)
    assert "idempotent-replayed" not in reused.headers
    assert [m["email"] for m in (await api.get(MEMBERS)).json()["data"]] == ["cy@example.com"]
    assert await count_rows(db, Event) == 1


async def test_the_same_json_written_otherwise_is_the_same_request(
    db: Database, api: ApiClient
) -> None:
    first = b'{"email": "ada@example.com", "first_name": "Ada"}'
    again = b'{\n  "first_name":"Ada",\n  "email":"ada@example.com"\n}'
    changed = b'{"first_name": "Ada", "email": "bea@example.com"}'
    headers = {"Authorization": f"Bearer {api.key}", "Content-Type": "application/json"}
    headers |= keyed("reordered")
    created = await api.http.post(MEMBERS, content=first, headers=headers)
    assert created.status_code == 201, created.text
    replayed = await api.http.post(MEMBERS, content=again, headers=headers)
    assert replayed.status_code == 201, replayed.text
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json() == created.json()
    refused = await api.http.post(MEMBERS, content=changed, headers=headers)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await count_rows(db, Member) == 1


async def test_a_keyed_body_with_a_lone_surrogate_is_refused_like_an_unkeyed_one(
    db: Database, api: ApiClient
) -> None:
    # JSON may escape half a surrogate pair; it parses, but is no text: 422, not a 500.
    body = b'{"email": "ed@example.com", "first_name": "a\\ud800b"}'
    headers = {"Authorization": f"Bearer {api.key}", "Content-Type": "application/json"}
    for extra in ({}, keyed("surrogate"), keyed("surrogate")):
        response = await api.http.post(MEMBERS, content=body, headers=headers | extra)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert await count_rows(db, Member) == 0


async def test_same_key_on_a_different_endpoint_is_422_idempotency_key_reused(
    api: ApiClient,
) -> None:
    first = await api.post(MEMBERS, {"email": "di@example.com"}, headers=keyed("k-path"))
    assert first.status_code == 201
    plan_body = {
        "code": "STD",
        "name": "Standard",
        "term_months": 12,
        "price_amount": 100,
        "currency": "MYR",
    }

    reused = await api.post("/api/v1/plans", plan_body, headers=keyed("k-path"))

    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert (await api.get("/api/v1/plans")).json()["data"] == []


async def test_idempotency_keys_are_per_api_key(db: Database, api: ApiClient) -> None:
    other = api.with_key(await issue_key(db, Role.ADMIN))

    mine = await api.post(MEMBERS, {"email": "e1@example.com"}, headers=keyed("shared-key"))
    theirs = await other.post(MEMBERS, {"email": "e2@example.com"}, headers=keyed("shared-key"))

    assert mine.status_code == 201
    # Not a replay of the first key's response, and not a 422 for a different body either.
    assert theirs.status_code == 201, theirs.text
    assert "idempotent-replayed" not in theirs.headers
    assert theirs.json()["id"] != mine.json()["id"]
    assert {m["email"] for m in (await api.get(MEMBERS)).json()["data"]} == {
        "e1@example.com",
        "e2@example.com",
    }

    # Each key replays its own response.
    again = await other.post(MEMBERS, {"email": "e2@example.com"}, headers=keyed("shared-key"))
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == theirs.json()["id"]


async def test_concurrent_identical_keyed_requests_create_exactly_one_member(
    db: Database, api: ApiClient
) -> None:
    body = {"email": "race@example.com", "first_name": "Race"}

    responses = await asyncio.gather(
        *(api.post(MEMBERS, body, headers=keyed("race-key")) for _ in range(5))
    )

    statuses = [r.status_code for r in responses]
    assert statuses == [201] * 5, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    replayed = [r.headers.get("idempotent-replayed") for r in responses]
    assert replayed.count("true") == 4
    assert await count_rows(db, Member) == 1
    assert len(await member_created_events(api)) == 1
    assert await count_rows(db, AuditEntry, AuditEntry.action == "member.create") == 1


async def test_failed_request_is_not_stored_so_a_retry_after_fixing_state_succeeds(
    api: ApiClient,
) -> None:
    existing = await api.create_member(email="taken@example.com")
    body = {"email": "taken@example.com", "first_name": "Second"}

    failed = await api.post(MEMBERS, body, headers=keyed("retry-me"))
    assert failed.status_code == 409, failed.text
    assert failed.json()["error"]["code"] == "DUPLICATE_EMAIL"

    # A retry before anything changed fails the same way: the 409 was not stored ...
    retried = await api.post(MEMBERS, body, headers=keyed("retry-me"))
    assert retried.status_code == 409
    assert "idempotent-replayed" not in retried.headers

    # ... so once the conflict is gone the same key goes through.
    assert (await api.delete(f"{MEMBERS}/{existing['id']}")).status_code == 204
    fixed = await api.post(MEMBERS, body, headers=keyed("retry-me"))
    assert fixed.status_code == 201, fixed.text
    assert "idempotent-replayed" not in fixed.headers
    assert fixed.json()["first_name"] == "Second"

    replay = await api.post(MEMBERS, body, headers=keyed("retry-me"))
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == fixed.json()["id"]


async def test_validation_failure_is_not_stored(api: ApiClient) -> None:
    invalid = await api.post(MEMBERS, {"email": "not-an-email"}, headers=keyed("bad-body"))
    assert invalid.status_code == 422
    assert invalid.json()["error"]["code"] == "VALIDATION_ERROR"

    # The key is still free for a different, valid body.
    valid = await api.post(MEMBERS, {"email": "fine@example.com"}, headers=keyed("bad-body"))
    assert valid.status_code == 201, valid.text


async def test_posts_without_a_key_are_not_deduplicated(api: ApiClient) -> None:
    first = await api.post(MEMBERS, {"email": "f1@example.com"})
    second = await api.post(MEMBERS, {"email": "f2@example.com"})
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] != second.json()["id"]
    assert "idempotent-replayed" not in second.headers


async def test_unusable_idempotency_key_is_rejected(api: ApiClient) -> None:
    too_long = await api.post(MEMBERS, {"email": "g@example.com"}, headers=keyed("k" * 256))
    assert too_long.status_code == 422
    assert too_long.json()["error"]["details"] == {"header": "Idempotency-Key"}
    assert (await api.get(MEMBERS)).json()["data"] == []


async def test_concurrent_identical_keyed_membership_joins_apply_once(api: ApiClient) -> None:
    member = await api.create_member()
    plan = await api.create_plan()
    path = f"{MEMBERS}/{member['id']}/membership/join"

    responses = await asyncio.gather(
        *(api.post(path, {"plan_id": plan["id"]}, headers=keyed("join-once")) for _ in range(5))
    )

    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert len({r.text for r in responses}) == 1
    history = await api.get(f"{MEMBERS}/{member['id']}/status-history")
    assert history.status_code == 200
    assert len(history.json()["data"]) == 1
    changes = await api.get(
        "/api/v1/events", params={"type": "member.status.changed", "member_id": member["id"]}
    )
    assert len(changes.json()["data"]) == 1


def test_a_body_received_into_a_file_has_the_fingerprint_of_its_bytes() -> None:
    body = bytes(range(256)) * 1000  # several read blocks
    request = ("POST", "/api/v1/points/bulk-awards", "reason=x")
    from_bytes = idempotency.fingerprint(*request, body)
    assert idempotency.fingerprint(*request, io.BytesIO(body)) == from_bytes
    assert idempotency.fingerprint(*request, io.BytesIO(body[:-1])) != from_bytes
