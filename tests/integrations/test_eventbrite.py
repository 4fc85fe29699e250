"""Eventbrite attendees become activities, end to end: notifications through the inbound
endpoint, read back from the (fake) Eventbrite API by the worker, and imports paged with
the continuation token; earning rules credit them once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.providers.eventbrite import UntrustedUrl, api_path
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from memberhub.worker.runner import Worker
from tests.fakes.eventbrite import FakeEventbrite, running_fake_eventbrite
from tests.support import ApiClient

TOKEN = "EVENTBRITEPRIVATETOKEN0001"
POINTS = 50
CPD_HOURS = 3.5


@pytest.fixture
async def eventbrite() -> AsyncIterator[FakeEventbrite]:
    async with running_fake_eventbrite(token=TOKEN) as fake:
        yield fake


@pytest.fixture
async def hub(settings: Settings, db: Database) -> AsyncIterator[IntegrationHub]:
    integrations = IntegrationHub(
        db, SecretBox(settings.resolved_secret_key), UrlPolicy.from_settings(settings)
    )
    yield integrations
    await integrations.aclose()


async def create_integration(
    api: ApiClient, fake: FakeEventbrite, events: list[dict[str, Any]]
) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "eventbrite",
            "name": "Eventbrite",
            "config": {"base_url": fake.url, "events": events},
            "credentials": {"private_token": TOKEN},
        },
    )
    assert response.status_code == 201, response.text
    body = dict(response.json())
    assert TOKEN not in response.text  # kept sealed, shown by its last characters only
    return body


async def attendance_rule(api: ApiClient) -> None:
    response = await api.post(
        "/api/v1/earning-rules",
        {
            "name": "Attending an event",
            "conditions": {"field": "activity.type", "op": "eq", "value": "event.attended"},
            "effect": {"type": "fixed_points", "points": POINTS},
        },
    )
    assert response.status_code == 201, response.text


async def notify(http: httpx.AsyncClient, integration_id: str, body: dict[str, Any]) -> None:
    response = await http.post(f"/api/v1/inbound/{integration_id}", json=body)
    assert response.status_code == 200, response.text


async def balance_of(api: ApiClient, member_id: str) -> int:
    response = await api.get(f"/api/v1/members/{member_id}/points/balance")
    assert response.status_code == 200, response.text
    body = response.json()
    return int(body["current_balance"]) + int(body["pending_balance"])


async def activities_of(api: ApiClient, member_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v1/members/{member_id}/activities")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def inbound_events(api: ApiClient, integration_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v1/integrations/{integration_id}/inbound-events")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def import_attendees(api: ApiClient, integration_id: str) -> dict[str, Any]:
    response = await api.post(f"/api/v1/integrations/{integration_id}/import")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_a_checked_in_attendee_earns_the_events_points_and_cpd_hours_once(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    eventbrite: FakeEventbrite,
) -> None:
    await attendance_rule(api)
    member = await api.create_member(email="ana.silva@example.com")
    event_id = eventbrite.add_event("Annual conference")
    integration = await create_integration(
        api, eventbrite, [{"event_id": event_id, "cpd_hours": CPD_HOURS}]
    )
    worker = Worker(db, hub=hub)

    order = eventbrite.place_order(event_id, "Ana.Silva@example.com")
    await notify(
        http, integration["id"], eventbrite.notification("order.placed", order["resource_uri"])
    )
    await worker.tick(force=True)
    [registered] = await activities_of(api, member["id"])
    assert registered["type"] == "event.registered"
    assert registered["source"] == "eventbrite"
    assert registered["attributes"] == {"event_id": event_id, "order_id": order["id"]}
    assert await balance_of(api, member["id"]) == 0

    attendee = eventbrite.check_in(order["attendees"][0]["id"])
    checked_in = eventbrite.notification("attendee.checked_in", eventbrite.attendee_url(attendee))
    await notify(http, integration["id"], checked_in)
    await worker.tick(force=True)
    assert await balance_of(api, member["id"]) == POINTS

    # Eventbrite sends the check-in again, and an update of the attendee; staff import.
    await notify(http, integration["id"], checked_in)
    updated = eventbrite.notification("attendee.updated", eventbrite.attendee_url(attendee))
    await notify(http, integration["id"], updated)
    await worker.tick(force=True)
    imported = await import_attendees(api, integration["id"])
    assert imported == {"recorded": 0, "replayed": 2, "matched": 0, "unmatched": 0, "points": 0}

    assert await balance_of(api, member["id"]) == POINTS
    activities = await activities_of(api, member["id"])
    attended = [a for a in activities if a["type"] == "event.attended"]
    assert len(activities) == 2
    assert len(attended) == 1
    assert attended[0]["attributes"]["cpd_hours"] == CPD_HOURS
    assert [c["points"] for c in attended[0]["credits"]] == [POINTS]
    events = await inbound_events(api, integration["id"])
    assert {e["status"] for e in events} == {"processed"}
    assert sum(e["result"]["activities"]["recorded"] for e in events) == 2
    # Every notification was read back from Eventbrite with the integration's token.
    assert eventbrite.count(f"/v3/orders/{order['id']}/") == 1
    assert eventbrite.count(f"/v3/events/{event_id}/attendees/{attendee['id']}/") >= 2


async def test_import_pages_through_attendees_with_the_continuation_token(
    api: ApiClient, db: Database, eventbrite: FakeEventbrite
) -> None:
    await attendance_rule(api)
    conference, workshop, other = (eventbrite.add_event(n) for n in ("Conf", "Workshop", "Other"))
    eventbrite.page_size = 2
    members = [await api.create_member(email=f"m{i}@example.com") for i in range(3)]
    orders = [
        eventbrite.place_order(conference, "m0@example.com", tickets=2),
        eventbrite.place_order(conference, "m1@example.com"),
        eventbrite.place_order(conference, "nobody@example.com"),
        eventbrite.place_order(conference, "m2@example.com"),
        eventbrite.place_order(workshop, "m2@example.com"),
        eventbrite.place_order(other, "m1@example.com"),  # not a chosen event
    ]
    eventbrite.check_in(orders[1]["attendees"][0]["id"])
    eventbrite.check_in(orders[4]["attendees"][0]["id"])
    eventbrite.cancel(orders[3]["attendees"][0]["id"])
    integration = await create_integration(
        api, eventbrite, [{"event_id": conference}, {"event_id": workshop, "cpd_hours": 2}]
    )

    first = await import_attendees(api, integration["id"])
    # Conference: 4 registrations (a cancelled one is none) and 1 attendance; workshop: 1 + 1.
    assert first == {
        "recorded": 7,
        "replayed": 0,
        "matched": 6,
        "unmatched": 1,
        "points": 2 * POINTS,
    }
    pages = [c for c in eventbrite.requests if c.path.endswith("/attendees/")]
    assert [(c.path.split("/")[3], "continuation" in c.query) for c in pages] == [
        (conference, False),
        (conference, True),
        (conference, True),
        (workshop, False),
    ]
    assert await balance_of(api, members[1]["id"]) == POINTS
    assert await balance_of(api, members[2]["id"]) == POINTS
    [workshop_attended] = [
        a for a in await activities_of(api, members[2]["id"]) if a["type"] == "event.attended"
    ]
    assert workshop_attended["attributes"]["cpd_hours"] == 2

    again = await import_attendees(api, integration["id"])
    assert again == {"recorded": 0, "replayed": 7, "matched": 0, "unmatched": 0, "points": 0}


async def test_a_notification_pointing_anywhere_but_the_eventbrite_api_is_refused(
    api: ApiClient, http: httpx.AsyncClient, db: Database, eventbrite: FakeEventbrite
) -> None:
    integration = await create_integration(api, eventbrite, [])
    for api_url in (
        "http://169.254.169.254/v3/orders/1/",
        f"{eventbrite.url.replace('127.0.0.1', 'localhost')}/v3/orders/1/",
        f"{eventbrite.url}/admin/",
        f"{eventbrite.url}/v3/../admin/",
    ):
        body = eventbrite.notification("order.placed", api_url)
        response = await http.post(f"/api/v1/inbound/{integration['id']}", json=body)
        assert response.status_code == 400, (api_url, response.text)
        assert response.json()["error"]["details"] == {"reason": "untrusted_api_url"}
    response = await http.post(f"/api/v1/inbound/{integration['id']}", json={"api_url": 1})
    assert response.status_code == 422
    # Unsigned, so anyone may post: a body nested deeper than a parser goes is refused too.
    deep = b"[" * 5000 + b"]" * 5000
    response = await http.post(
        f"/api/v1/inbound/{integration['id']}",
        content=deep,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert await inbound_events(api, integration["id"]) == []
    assert eventbrite.requests == []


def test_api_path_keeps_only_the_api_hosts_v3_resources() -> None:
    base = "https://www.eventbriteapi.com"
    assert api_path(f"{base}/v3/orders/12/?expand=attendees", base) == (
        "/v3/orders/12/?expand=attendees"
    )
    for url in (
        "https://www.eventbriteapi.com.evil.example/v3/orders/12/",
        "http://www.eventbriteapi.com/v3/orders/12/",
        "https://user:pw@www.eventbriteapi.com/v3/orders/12/",
        "https://www.eventbriteapi.com:8443/v3/orders/12/",
        "https://www.eventbriteapi.com/v2/orders/12/",
        "not a url",
    ):
        with pytest.raises(UntrustedUrl):
            api_path(url, base)
