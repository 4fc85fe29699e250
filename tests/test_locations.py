"""A create answers 201 with a `Location` that reads back what it created, for every
resource that can be read by its id; the description says so for each of them."""

from __future__ import annotations

import re
from typing import Any

from tests.support import ApiClient, unique
from tests.test_openapi import _spec


async def _created(api: ApiClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post(path, body)
    assert response.status_code == 201, response.text
    created = response.json()
    location = response.headers["Location"]
    assert location == f"{path}/{created['id']}"
    read = await api.get(location)
    assert read.status_code == 200, read.text
    assert read.json()["id"] == created["id"]
    return dict(created)


async def test_every_create_says_where_the_created_object_is(api: ApiClient) -> None:
    await _created(api, "/api/v1/organisations", {"name": "North", "slug": unique("north-")})
    plan = {"code": "STD", "name": "Standard", "term_months": 12, "price_amount": 100}
    await _created(api, "/api/v1/plans", {**plan, "currency": "MYR"})
    await _created(
        api, "/api/v1/tiers", {"code": "GOLD", "name": "Gold", "rank": 1, "threshold": 5}
    )
    await _created(api, "/api/v1/rewards", {"code": "MUG", "name": "Mug", "points_cost": 10})
    template = {
        "message_type": "member_welcome",
        "channel": "email",
        "locale": "en",
        "subject": "Welcome",
        "body": "Hello {{ member.first_name }}",
    }
    await _created(api, "/api/v1/notification-templates", template)
    hook = {"url": "http://127.0.0.1:9/hooks", "event_types": ["member.*"]}
    await _created(api, "/api/v1/webhook-endpoints", hook)
    segment = {
        "provider": "segment",
        "name": "Segment",
        "config": {"base_url": "http://127.0.0.1:9"},
        "credentials": {"write_key": "test-write-key"},
    }
    integration = await _created(api, "/api/v1/integrations", segment)
    sink = {"integration_id": integration["id"], "name": "Analytics", "event_types": ["member.*"]}
    await _created(api, "/api/v1/event-sinks", sink)
    await _created(
        api, "/api/v1/staff", {"email": "ana@example.org", "name": "Ana", "role": "support_agent"}
    )
    await _created(api, "/api/v1/api-keys", {"name": "reporting", "role": "integration"})


def test_the_description_names_the_location_of_every_created_object() -> None:
    paths = _spec()["paths"]
    addressable = [
        path
        for path, operations in paths.items()
        if "201" in operations.get("post", {}).get("responses", {})
        and any(
            re.fullmatch(re.escape(path) + r"/\{[a-z_]+\}", other) and "get" in paths[other]
            for other in paths
        )
    ]
    assert len(addressable) >= 15
    missing = [
        path
        for path in addressable
        if "Location" not in paths[path]["post"]["responses"]["201"].get("headers", {})
    ]
    assert missing == []
