"""Signed webhooks that act: a saved mapping turns each event's JSON into an activity, which
earns by the earning rules; bad mappings are refused with their path; a test endpoint shows
what a sample body would record."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from memberhub.integrations.activity_mapping import (
    MISSING,
    ActivityMapping,
    build_activity,
    resolve,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.activities.conftest import balance, create_rule, on_type
from tests.integrations.conftest import run_worker
from tests.support import ApiClient

# Standard Webhooks secrets are `whsec_` and base64.
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MAPPING: dict[str, Any] = {
    "type": "/type",
    "source_id": "/data/booking/id",
    "occurred_at": "/data/booking/completed_at",
    "email": "/data/customer/email",
    "external_id": "/data/customer/id",
    "external_system": "bookings",
    "attributes": {
        "amount": "/data/booking/total_cents",
        "currency": "/data/booking/currency",
        "category": "/data/booking/treatment~1kind",
        "custom.room": "/data/booking/rooms/0",
    },
}


def booking(email: str, *, booking_id: str = "B-1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "booking.completed",
        "data": {
            "customer": {"email": email, "id": 7001},
            "booking": {
                "id": booking_id,
                "completed_at": "2026-01-10T09:30:00Z",
                "total_cents": 25000,
                "currency": "MYR",
                "treatment/kind": "spa",
                "rooms": ["R12", "R14"],
            },
        },
    }
    body["data"]["booking"].update(overrides)
    return body


def standard_signed(
    event: dict[str, Any], webhook_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event).encode()
    webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    now = time.time()
    signature = Webhook(SIGNING_SECRET).sign(
        webhook_id, datetime.fromtimestamp(now, UTC), body.decode()
    )
    return body, {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": signature,
        "Content-Type": "application/json",
    }


async def create_source(api: ApiClient, mapping: dict[str, Any] | None) -> httpx.Response:
    config: dict[str, Any] = {"scheme": "standard"}
    if mapping is not None:
        config["activity"] = mapping
    return await api.post(
        "/api/v1/integrations",
        {
            "provider": "webhook",
            "name": "Bookings",
            "config": config,
            "credentials": {"signing_secret": SIGNING_SECRET},
        },
    )


async def inbound_events(api: ApiClient, integration_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v1/integrations/{integration_id}/inbound-events")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def event_detail(api: ApiClient, event_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/inbound-events/{event_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_a_signed_event_records_an_activity_that_earns_by_the_rules_once(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    member = await api.create_member(email="ana.silva@example.com")
    await create_rule(
        api,
        name="Bookings earn 1 point per 1 MYR",
        conditions={
            "all": [
                on_type("booking.completed"),
                {"field": "activity.attributes.category", "op": "eq", "value": "spa"},
            ]
        },
        effect={
            "type": "points_per_amount",
            "points": 1,
            "per_amount": 100,
            "currency": "MYR",
            "max_points": 5000,
        },
    )
    created = await create_source(api, MAPPING)
    assert created.status_code == 201, created.text
    integration = created.json()["id"]
    assert created.json()["config"]["activity"]["source_id"] == "/data/booking/id"

    body, headers = standard_signed(booking("Ana.Silva@example.com"))
    accepted = await http.post(f"/api/v1/inbound/{integration}", content=body, headers=headers)
    assert accepted.status_code == 200, accepted.text
    await run_worker(db)

    [event] = await inbound_events(api, integration)
    assert event["status"] == "processed", event
    result = (await event_detail(api, event["id"]))["result"]
    assert result["member_id"] == member["id"]
    assert result["points"] == 250
    assert result["replayed"] is False
    assert await balance(api, member["id"]) == 250

    activity = (await api.get(f"/api/v1/activities/{result['activity_id']}")).json()
    assert activity["source"] == integration
    assert activity["source_id"] == "B-1"
    assert activity["type"] == "booking.completed"
    assert activity["occurred_at"].startswith("2026-01-10T09:30:00")
    assert activity["attributes"] == {
        "amount": 25000,
        "currency": "MYR",
        "category": "spa",
        "custom": {"room": "R12"},
    }

    # The sender delivers the same booking again under a new message id: a replay.
    body, headers = standard_signed(booking("ana.silva@example.com"))
    again = await http.post(f"/api/v1/inbound/{integration}", content=body, headers=headers)
    assert again.status_code == 200, again.text
    await run_worker(db)
    replayed = [e for e in await inbound_events(api, integration) if e["id"] != event["id"]]
    detail = await event_detail(api, replayed[0]["id"])
    assert detail["status"] == "processed"
    assert detail["result"]["replayed"] is True
    assert detail["result"]["points"] == 0  # what this delivery earned
    assert detail["result"]["activity_id"] == result["activity_id"]
    assert await balance(api, member["id"]) == 250


async def test_an_event_missing_a_mapped_value_fails_with_the_reason_and_records_nothing(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    await api.create_member(email="ana.silva@example.com")
    integration = (await create_source(api, MAPPING)).json()["id"]
    event = booking("ana.silva@example.com")
    del event["data"]["booking"]["id"]
    event["data"]["booking"]["total_cents"] = "250.00"
    body, headers = standard_signed(event)
    assert (
        await http.post(f"/api/v1/inbound/{integration}", content=body, headers=headers)
    ).is_success

    await run_worker(db)

    [stored] = await inbound_events(api, integration)
    assert stored["status"] == "failed"
    detail = await event_detail(api, stored["id"])
    assert "source_id: the payload has no value at '/data/booking/id'" in detail["error"]
    problems = detail["result"]["error_details"]["problems"]
    assert problems == [
        {
            "field": "source_id",
            "pointer": "/data/booking/id",
            "message": "the payload has no value at '/data/booking/id'",
        }
    ]
    listed = await api.get("/api/v1/activities")
    assert listed.json()["data"] == []

    # Given the id, the amount's type is the problem named.
    event["data"]["booking"]["id"] = "B-2"
    body, headers = standard_signed(event)
    assert (
        await http.post(f"/api/v1/inbound/{integration}", content=body, headers=headers)
    ).is_success
    await run_worker(db)
    failed = [e for e in await inbound_events(api, integration) if e["id"] != stored["id"]]
    detail = await event_detail(api, failed[0]["id"])
    assert detail["status"] == "failed"
    [problem] = detail["result"]["error_details"]["problems"]
    assert problem["field"] == "attributes.amount"
    assert problem["pointer"] == "/data/booking/total_cents"


async def test_a_bad_mapping_is_refused_with_the_path_of_each_problem(api: ApiClient) -> None:
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "pointer syntax": ({**MAPPING, "email": "data/customer/email"}, "config.activity.email"),
        "bad escape": ({**MAPPING, "type": "/a~2b"}, "config.activity.type"),
        "unknown attribute": (
            {**MAPPING, "attributes": {"points": "/data/points"}},
            "config.activity.attributes.points.[key]",
        ),
        "no type": ({k: v for k, v in MAPPING.items() if k != "type"}, "config.activity"),
        "two types": ({**MAPPING, "fixed_type": "booking.completed"}, "config.activity"),
        "no member key": (
            {k: v for k, v in MAPPING.items() if k not in ("email", "external_id")}
            | {"external_system": None},
            "config.activity",
        ),
        "no source id": (
            {k: v for k, v in MAPPING.items() if k != "source_id"},
            "config.activity.source_id",
        ),
        "bad fixed type": (
            {**{k: v for k, v in MAPPING.items() if k != "type"}, "fixed_type": "Booking!"},
            "config.activity.fixed_type",
        ),
    }
    for case, (mapping, path) in cases.items():
        response = await create_source(api, mapping)
        assert response.status_code == 422, (case, response.text)
        fields = response.json()["error"]["details"]["fields"]
        assert path in [field["field"] for field in fields], (case, fields)
    assert (await api.get("/api/v1/integrations")).json()["data"] == []

    # A saved integration's mapping is checked the same way when it changes.
    integration = (await create_source(api, None)).json()["id"]
    patched = await api.patch(
        f"/api/v1/integrations/{integration}",
        {"config": {"activity": {**MAPPING, "occurred_at": "x/"}}},
    )
    assert patched.status_code == 422, patched.text
    fields = patched.json()["error"]["details"]["fields"]
    assert [field["field"] for field in fields] == ["config.activity.occurred_at"]


async def test_the_test_endpoint_shows_the_activity_or_the_problems_and_writes_nothing(
    api: ApiClient,
) -> None:
    integration = (await create_source(api, MAPPING)).json()["id"]
    url = f"/api/v1/integrations/{integration}/activity-mapping/test"

    shown = await api.post(url, {"payload": booking("ana@example.com", booking_id="B-9")})
    assert shown.status_code == 200, shown.text
    assert shown.json() == {
        "activity": {
            "type": "booking.completed",
            "occurred_at": "2026-01-10T09:30:00Z",
            "source": integration,
            "source_id": "B-9",
            "member_id": None,
            "external_id": "bookings:7001",
            "email": "ana@example.com",
            "organisation_id": None,
            "attributes": {
                "amount": 25000,
                "currency": "MYR",
                "paid_amount": None,
                "paid_currency": None,
                "quantity": None,
                "items": None,
                "event_id": None,
                "cpd_hours": None,
                "order_id": None,
                "booking_id": None,
                "category": "spa",
                "channel": None,
                "location": None,
                "tags": None,
                "custom": {"room": "R12"},
            },
        },
        "problems": [],
    }

    lacking = booking("ana@example.com")
    lacking["data"]["customer"] = {}
    lacking["data"]["booking"]["currency"] = None
    problems = await api.post(url, {"payload": lacking})
    assert problems.status_code == 200, problems.text
    assert problems.json()["activity"] is None
    [problem] = problems.json()["problems"]
    assert problem["field"] == "member"
    assert "'/data/customer/email'" in problem["message"]

    # An unsaved mapping can be tried first; a bad one is refused with its path.
    tried = await api.post(
        url,
        {
            "payload": {"kind": "visit", "who": {"member": "mem_x"}, "n": 42, "at": 1767000000},
            "mapping": {
                "fixed_type": "visit.recorded",
                "source_id": "/n",
                "member_id": "/who/member",
                "occurred_at": "/at",
            },
        },
    )
    assert tried.status_code == 200, tried.text
    activity = tried.json()["activity"]
    assert (activity["type"], activity["source_id"], activity["member_id"]) == (
        "visit.recorded",
        "42",
        "mem_x",
    )
    assert activity["occurred_at"] == "2025-12-29T09:20:00Z"
    refused = await api.post(
        url, {"payload": {}, "mapping": {"fixed_type": "visit.recorded", "source_id": "n"}}
    )
    assert refused.status_code == 422
    assert (await api.get("/api/v1/activities")).json()["data"] == []

    no_mapping = (await create_source(api, None)).json()["id"]
    missing = await api.post(
        f"/api/v1/integrations/{no_mapping}/activity-mapping/test", {"payload": {}}
    )
    assert missing.status_code == 422
    assert missing.json()["error"]["code"] == "NO_ACTIVITY_MAPPING"


def test_pointers_follow_rfc_6901() -> None:
    document = {"foo": ["bar", "baz"], "": 0, "a/b": 1, "m~n": 8, 'k"l': 6}
    assert resolve(document, "") == document
    assert resolve(document, "/foo") == ["bar", "baz"]
    assert resolve(document, "/foo/0") == "bar"
    assert resolve(document, "/") == 0
    assert resolve(document, "/a~1b") == 1
    assert resolve(document, "/m~0n") == 8
    assert resolve(document, '/k"l') == 6
    for absent in ("/foo/2", "/foo/01", "/foo/-", "/nope", "/foo/0/x"):
        assert resolve(document, absent) is MISSING
        activity, problems = build_activity(
            ActivityMapping.model_validate(
                {"fixed_type": "a.b", "source_id": absent, "member_id": "/foo/0"}
            ),
            document,
            source="src",
            received_at=utcnow(),
        )
        assert activity is None
        assert [problem.field for problem in problems] == ["source_id"]
