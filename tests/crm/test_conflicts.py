"""Changes on both sides: each conflict policy, manual review, echoes of our own writes."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from hubspot.utils.signature import Signature

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.crm.conftest import CRM_CONSENT, Crm, create_integration, sync, tick
from tests.fakes.hubspot import FakeHubSpot
from tests.support import ApiClient

APP_SECRET = "hubspot-app-secret"


@pytest.fixture
async def linked(
    api: ApiClient, db: Database, hub: IntegrationHub, hubspot: FakeHubSpot, request: Any
) -> dict[str, Any]:
    """A member pushed to HubSpot under the conflict policy the test is parametrised with."""
    policy = getattr(request, "param", "memberhub_wins")
    member = await api.create_member(first_name="Ana", last_name="Lim", consent=CRM_CONSENT)
    body = Crm("hubspot", hubspot).integration_body(conflict_policy=policy)
    integration = await create_integration(api, body)
    run = await sync(api, db, hub, integration["id"], mode="push")
    assert run["created"] == 1, run
    [contact_id] = [
        cid for cid, p in hubspot.contacts.items() if p["email"] == member["email"].lower()
    ]
    return {"member": member, "integration": integration, "contact_id": contact_id}


async def first_name(api: ApiClient, member_id: str) -> str:
    return str((await api.get(f"/api/v1/members/{member_id}")).json()["first_name"])


async def edit_both_sides(
    api: ApiClient, hubspot: FakeHubSpot, linked: dict[str, Any], *, crm_offset: timedelta
) -> None:
    hubspot.update_contact(
        linked["contact_id"], {"firstname": "Crm"}, modified_at=utcnow() + crm_offset
    )
    response = await api.patch(f"/api/v1/members/{linked['member']['id']}", {"first_name": "Local"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("linked", "crm_offset", "winner"),
    [
        ("memberhub_wins", timedelta(hours=1), "Local"),
        ("crm_wins", timedelta(0), "Crm"),
        # The CRM's edit is stamped an hour ahead: newer than ours.
        ("newest", timedelta(hours=1), "Crm"),
        # The CRM's edit is stamped now, before ours is made.
        ("newest", timedelta(0), "Local"),
    ],
    indirect=["linked"],
)
async def test_a_field_changed_on_both_sides_follows_the_policy(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    hubspot: FakeHubSpot,
    linked: dict[str, Any],
    crm_offset: timedelta,
    winner: str,
) -> None:
    await edit_both_sides(api, hubspot, linked, crm_offset=crm_offset)
    run = await sync(api, db, hub, linked["integration"]["id"], mode="pull")
    assert run["failed"] == 0, run
    await tick(db, hub)  # the changes push that follows
    assert await first_name(api, linked["member"]["id"]) == winner
    assert hubspot.contacts[linked["contact_id"]]["firstname"] == winner


@pytest.mark.parametrize("linked", ["manual"], indirect=True)
async def test_manual_review_holds_both_values_until_resolved(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    hubspot: FakeHubSpot,
    linked: dict[str, Any],
) -> None:
    integration_id = linked["integration"]["id"]
    await edit_both_sides(api, hubspot, linked, crm_offset=timedelta(0))
    run = await sync(api, db, hub, integration_id, mode="pull")
    assert run["conflicts"] == 1, run
    await tick(db, hub)
    await tick(db, hub)
    # Neither side overwrote the other.
    assert await first_name(api, linked["member"]["id"]) == "Local"
    assert hubspot.contacts[linked["contact_id"]]["firstname"] == "Crm"
    listed = (await api.get(f"/api/v1/integrations/{integration_id}/conflicts")).json()["data"]
    [conflict] = listed
    assert (conflict["property"], conflict["field"], conflict["status"]) == (
        "firstname",
        "first_name",
        "open",
    )
    assert (conflict["memberhub_value"], conflict["crm_value"]) == ("Local", "Crm")

    writes = hubspot.writes()
    resolved = await api.post(f"/api/v1/crm-conflicts/{conflict['id']}/resolve", {"keep": "crm"})
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["resolution"] == "crm"
    again = await api.post(f"/api/v1/crm-conflicts/{conflict['id']}/resolve", {"keep": "crm"})
    assert again.status_code == 409
    await tick(db, hub)
    assert await first_name(api, linked["member"]["id"]) == "Crm"
    assert hubspot.writes() == writes  # the CRM already had it


@pytest.mark.parametrize("linked", ["manual"], indirect=True)
async def test_keeping_the_crms_value_takes_its_newest_value(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    hubspot: FakeHubSpot,
    linked: dict[str, Any],
) -> None:
    integration_id, member_id = linked["integration"]["id"], linked["member"]["id"]
    await edit_both_sides(api, hubspot, linked, crm_offset=timedelta(0))
    assert (await sync(api, db, hub, integration_id, mode="pull"))["conflicts"] == 1
    # Changed again in the CRM while the conflict waits for review.
    hubspot.update_contact(
        linked["contact_id"], {"firstname": "Crm2"}, modified_at=utcnow() + timedelta(seconds=5)
    )
    await sync(api, db, hub, integration_id, mode="pull")
    [conflict] = (await api.get(f"/api/v1/integrations/{integration_id}/conflicts")).json()["data"]
    assert conflict["crm_value"] == "Crm2"
    resolved = await api.post(f"/api/v1/crm-conflicts/{conflict['id']}/resolve", {"keep": "crm"})
    assert resolved.status_code == 200, resolved.text
    await tick(db, hub)
    await sync(api, db, hub, integration_id, mode="pull")
    await tick(db, hub)
    assert await first_name(api, member_id) == "Crm2"
    assert hubspot.contacts[linked["contact_id"]]["firstname"] == "Crm2"


@pytest.mark.parametrize("linked", ["manual"], indirect=True)
async def test_keeping_memberhubs_value_sends_it_to_the_crm(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    hubspot: FakeHubSpot,
    linked: dict[str, Any],
) -> None:
    integration_id = linked["integration"]["id"]
    await edit_both_sides(api, hubspot, linked, crm_offset=timedelta(0))
    await sync(api, db, hub, integration_id, mode="pull")
    [conflict] = (await api.get(f"/api/v1/integrations/{integration_id}/conflicts")).json()["data"]
    resolved = await api.post(
        f"/api/v1/crm-conflicts/{conflict['id']}/resolve", {"keep": "memberhub"}
    )
    assert resolved.status_code == 200, resolved.text
    await tick(db, hub)
    assert hubspot.contacts[linked["contact_id"]]["firstname"] == "Local"
    assert await first_name(api, linked["member"]["id"]) == "Local"


@pytest.mark.parametrize("linked", ["manual"], indirect=True)
async def test_a_change_on_one_side_only_is_simply_taken(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    hubspot: FakeHubSpot,
    linked: dict[str, Any],
) -> None:
    hubspot.update_contact(linked["contact_id"], {"lastname": "Tan"}, modified_at=utcnow())
    run = await sync(api, db, hub, linked["integration"]["id"], mode="pull")
    assert (run["updated"], run["conflicts"]) == (1, 0), run
    member = (await api.get(f"/api/v1/members/{linked['member']['id']}")).json()
    assert member["last_name"] == "Tan"


def webhook(contact_id: str, name: str, value: str, event_id: int) -> list[dict[str, Any]]:
    return [
        {
            "eventId": event_id,
            "subscriptionId": 1,
            "portalId": 42,
            "appId": 1,
            "occurredAt": int(time.time() * 1000),
            "subscriptionType": "contact.propertyChange",
            "attemptNumber": 0,
            "objectId": int(contact_id),
            "propertyName": name,
            "propertyValue": value,
            "changeSource": "INTEGRATION",
        }
    ]


async def deliver(http: httpx.AsyncClient, integration_id: str, events: list[Any]) -> None:
    path = f"/api/v1/inbound/{integration_id}"
    body = json.dumps(events)
    timestamp = str(int(time.time() * 1000))
    signature = Signature.get_signature(
        APP_SECRET,
        body,
        "v3",
        http_uri=f"http://testserver{path}",
        http_method="POST",
        timestamp=timestamp,
    )
    response = await http.post(
        path,
        content=body,
        headers={
            "X-HubSpot-Signature-v3": signature,
            "X-HubSpot-Request-Timestamp": timestamp,
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 200, response.text


async def test_an_echo_of_our_own_write_applies_nothing(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    hubspot: FakeHubSpot,
    linked: dict[str, Any],
) -> None:
    member_id, integration_id = linked["member"]["id"], linked["integration"]["id"]
    await api.patch(f"/api/v1/members/{member_id}", {"first_name": "Bea"})
    await tick(db, hub)
    assert hubspot.contacts[linked["contact_id"]]["firstname"] == "Bea"
    version = (await api.get(f"/api/v1/members/{member_id}")).json()["version"]
    writes = hubspot.writes()

    # HubSpot's notice of our first write arrives late: it must not take "Ana" back.
    await deliver(http, integration_id, webhook(linked["contact_id"], "firstname", "Ana", 1))
    # And the notice of our second write changes nothing either.
    await deliver(http, integration_id, webhook(linked["contact_id"], "firstname", "Bea", 2))
    await tick(db, hub)
    await tick(db, hub)
    member = (await api.get(f"/api/v1/members/{member_id}")).json()
    assert (member["first_name"], member["version"]) == ("Bea", version)
    assert hubspot.writes() == writes

    # A real edit in HubSpot, sent the same way, is taken.
    await deliver(http, integration_id, webhook(linked["contact_id"], "firstname", "Cara", 3))
    await tick(db, hub)
    assert await first_name(api, member_id) == "Cara"
    await tick(db, hub)
    assert hubspot.writes() == writes  # and it is not written back


async def test_a_late_retry_of_an_older_webhook_does_not_undo_a_newer_change(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    linked: dict[str, Any],
) -> None:
    member_id, integration_id = linked["member"]["id"], linked["integration"]["id"]
    newer = webhook(linked["contact_id"], "firstname", "Newer", 10)
    older = webhook(linked["contact_id"], "firstname", "Older", 11)
    older[0]["occurredAt"] = newer[0]["occurredAt"] - 60_000  # sent a minute earlier
    await deliver(http, integration_id, newer)
    await tick(db, hub)
    assert await first_name(api, member_id) == "Newer"
    await deliver(http, integration_id, older)
    await tick(db, hub)
    assert await first_name(api, member_id) == "Newer"
