"""Members of different organisations may share an address, and an installation-wide
Mailchimp integration then has one list member for both (Mailchimp's id is the MD5 of the
lower-cased address). One of them owns the address: the consenting member in scope with
the lowest id. Only the owner's data is written, only the owner is segmented and starts
journeys, the address is unsubscribed only when no member sharing it still consents, and
ownership moves when the owner withdraws, is erased or leaves the integration's scope."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from memberhub.marketing import service, sync
from memberhub.marketing.models import MarketingContact
from memberhub.members.models import Member
from tests.fakes.mailchimp import FakeMailchimp
from tests.marketing.conftest import WEBHOOK_SECRET, create_mailchimp, status, tick
from tests.support import ApiClient

SHARED = "Shared.Person@example.com"
GOLD_WELCOME = {
    "key": "gold-welcome",
    "trigger": "tier_reached",
    "tier": "gold",
    "journey_id": "77",
    "step_id": "5",
}


async def two_members_sharing_an_address(
    api: ApiClient, *, first_consent: bool = True, second_consent: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two members of two organisations with one address; the first has the lower id."""
    north = await api.create_organisation(name="North")
    south = await api.create_organisation(name="South")
    first = await api.create_member(
        email=SHARED,
        first_name="First",
        organisation_id=north["id"],
        consent={"marketing_email": first_consent},
    )
    second = await api.create_member(
        email=SHARED.upper(),
        first_name="Second",
        organisation_id=south["id"],
        consent={"marketing_email": second_consent},
    )
    return first, second


def sent_for(fake: FakeMailchimp, email: str) -> list[dict[str, Any]]:
    """Every member body batch-subscribed for the address, in order."""
    return [
        m
        for r in fake.writes()
        if isinstance(r.body, dict)
        for m in r.body.get("members", [])
        if m["email_address"].lower() == email.lower()
    ]


async def withdraw(api: ApiClient, member_id: str) -> None:
    response = await api.patch(
        f"/api/v1/members/{member_id}", {"consent": {"marketing_email": False}}
    )
    assert response.status_code == 200, response.text


async def test_one_member_withdrawing_keeps_the_address_subscribed_for_the_other(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    first, second = await two_members_sharing_an_address(api)
    await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)

    await withdraw(api, first["id"])
    await tick(db, hub)
    held = mailchimp.member(list_id, SHARED)

    assert held is not None
    assert held["status"] == "subscribed"
    assert held["merge_fields"]["FNAME"] == "Second"  # the address moved to the other
    assert not [m for m in sent_for(mailchimp, SHARED) if m["status"] == "unsubscribed"]

    await withdraw(api, second["id"])  # the last one to consent: now it goes
    await tick(db, hub)
    gone = mailchimp.member(list_id, SHARED)
    assert gone is not None
    assert gone["status"] == "unsubscribed"


async def test_the_non_owner_withdrawing_sends_nothing(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    _, second = await two_members_sharing_an_address(api)
    await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)
    writes_before = len(mailchimp.writes())

    await withdraw(api, second["id"])
    await tick(db, hub)

    assert len(mailchimp.writes()) == writes_before
    held = mailchimp.member(list_id, SHARED)
    assert held is not None
    assert held["status"] == "subscribed"
    assert held["merge_fields"]["FNAME"] == "First"


async def test_erasing_one_member_keeps_the_address_subscribed_for_the_other(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    first, _ = await two_members_sharing_an_address(api)
    await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)

    erased = await api.delete(f"/api/v1/members/{first['id']}")
    assert erased.status_code == 204, erased.text
    await tick(db, hub)
    held = mailchimp.member(list_id, SHARED)

    assert held is not None
    assert held["status"] == "subscribed"
    assert held["merge_fields"]["FNAME"] == "Second"


async def test_an_owner_leaving_the_integrations_scope_hands_the_address_on(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    """An integration of a parent organisation serves its chapters; a member moved out of
    them leaves its scope, and the address passes to the member who stays."""
    list_id = mailchimp.add_list()
    parent = await api.create_organisation(name="Parent")
    chapter = await api.create_organisation(parent_id=parent["id"], name="Chapter")
    elsewhere = await api.create_organisation(name="Elsewhere")
    first = await api.create_member(
        email=SHARED,
        first_name="First",
        organisation_id=chapter["id"],
        consent={"marketing_email": True},
    )
    await api.create_member(
        email=SHARED,
        first_name="Second",
        organisation_id=parent["id"],
        consent={"marketing_email": True},
    )
    settings = {"organisation_id": parent["id"]}
    response = await api.post(
        "/api/v1/integrations",
        {
            "provider": "mailchimp",
            "name": "Mailchimp",
            "config": {"base_url": mailchimp.url, "list_id": list_id},
            "credentials": {"api_key": mailchimp.api_key},
            **settings,
        },
    )
    assert response.status_code == 201, response.text
    await tick(db, hub)
    assert mailchimp.member(list_id, SHARED)["merge_fields"]["FNAME"] == "First"  # type: ignore[index]

    moved = await api.patch(f"/api/v1/members/{first['id']}", {"organisation_id": elsewhere["id"]})
    assert moved.status_code == 200, moved.text
    await tick(db, hub)
    held = mailchimp.member(list_id, SHARED)

    assert held is not None
    assert held["status"] == "subscribed"
    assert held["merge_fields"]["FNAME"] == "Second"


async def test_members_sharing_an_address_do_not_overwrite_each_other(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    for code, rank in (("silver", 1), ("gold", 2)):
        created = await api.post(
            "/api/v1/tiers",
            {"code": code, "name": code.title(), "rank": rank, "threshold": rank * 1000},
        )
        assert created.status_code == 201, created.text
    _, second = await two_members_sharing_an_address(api)
    integration = await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)
    first_run = sent_for(mailchimp, SHARED)

    for name in ("Again", "And again"):
        renamed = await api.patch(f"/api/v1/members/{second['id']}", {"first_name": name})
        assert renamed.status_code == 200, renamed.text
        await tick(db, hub)
    assigned = await api.post(
        "/api/v1/tiers/assign",
        {"member_id": second["id"], "tier_code": "gold", "reason": "vip"},
    )
    assert assigned.status_code == 200, assigned.text
    await tick(db, hub)
    await tick(db, hub)
    held = mailchimp.member(list_id, SHARED)

    assert [m["merge_fields"]["FNAME"] for m in first_run] == ["First"]  # one write, not two
    assert held is not None
    assert held["merge_fields"]["FNAME"] == "First"
    assert held["merge_fields"]["TIER"] == ""
    assert {t["name"] for t in held["tags"]} == {"status:pending"}
    assert all(m["merge_fields"]["FNAME"] == "First" for m in sent_for(mailchimp, SHARED))
    assert (await status(api, integration["id"]))["contacts"] == {"subscribed": 1}


async def test_segments_and_journeys_follow_the_owner_of_a_shared_address(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    mailchimp.add_journey(77, list_id, {5})
    for code, rank in (("silver", 1), ("gold", 2)):
        created = await api.post(
            "/api/v1/tiers",
            {"code": code, "name": code.title(), "rank": rank, "threshold": rank * 1000},
        )
        assert created.status_code == 201, created.text
    _, second = await two_members_sharing_an_address(api)
    await create_mailchimp(
        api,
        mailchimp,
        list_id,
        segments=[{"key": "gold", "name": "Gold", "conditions": {"tiers": ["gold"]}}],
        journeys=[GOLD_WELCOME],
    )
    await tick(db, hub)

    assigned = await api.post(
        "/api/v1/tiers/assign",
        {"member_id": second["id"], "tier_code": "gold", "reason": "vip"},
    )
    assert assigned.status_code == 200, assigned.text
    asked = await api.post(
        f"/api/v1/integrations/{(await api.get('/api/v1/integrations')).json()['data'][0]['id']}"
        "/marketing/sync",
        {"full": True},
    )
    assert asked.status_code == 202, asked.text
    await tick(db, hub)
    await tick(db, hub)

    # The list member is the first member's, who is not gold: neither in the segment nor
    # sent the gold journey.
    assert (mailchimp.segment_members(list_id, "Gold"), mailchimp.triggers) == (set(), [])


async def test_ownership_returns_to_the_lower_id_when_it_consents_again(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    first, _ = await two_members_sharing_an_address(api, first_consent=False)
    integration = await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)
    assert mailchimp.member(list_id, SHARED)["merge_fields"]["FNAME"] == "Second"  # type: ignore[index]

    again = await api.patch(
        f"/api/v1/members/{first['id']}", {"consent": {"marketing_email": True}}
    )
    assert again.status_code == 200, again.text
    await tick(db, hub)
    held = mailchimp.member(list_id, SHARED)

    assert held is not None
    assert held["status"] == "subscribed"
    assert held["merge_fields"]["FNAME"] == "First"
    assert (await status(api, integration["id"]))["contacts"] == {"subscribed": 1}


async def test_an_owner_changing_address_hands_the_old_one_on_and_takes_the_new(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    first, _ = await two_members_sharing_an_address(api)
    await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)

    moved = await api.patch(f"/api/v1/members/{first['id']}", {"email": "first@example.com"})
    assert moved.status_code == 200, moved.text
    await tick(db, hub)
    shared = mailchimp.member(list_id, SHARED)
    own = mailchimp.member(list_id, "first@example.com")

    assert shared is not None
    assert (shared["status"], shared["merge_fields"]["FNAME"]) == ("subscribed", "Second")
    assert own is not None
    assert (own["status"], own["merge_fields"]["FNAME"]) == ("subscribed", "First")
    assert not [m for m in sent_for(mailchimp, SHARED) if m["status"] == "unsubscribed"]


async def test_a_full_comparison_writes_a_shared_address_once_across_member_chunks(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    mailchimp: FakeMailchimp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sync, "MEMBER_CHUNK", 1)
    monkeypatch.setattr(service, "MEMBER_CHUNK", 1)
    list_id = mailchimp.add_list()
    await two_members_sharing_an_address(api)
    integration = await create_mailchimp(api, mailchimp, list_id)

    plan = await api.post(
        f"/api/v1/integrations/{integration['id']}/marketing/sync", {"dry_run": True, "full": True}
    )
    await tick(db, hub)

    assert plan.status_code == 200, plan.text
    assert [w["merge_fields"]["FNAME"] for w in plan.json()["writes"]] == ["First"]
    assert [m["merge_fields"]["FNAME"] for m in sent_for(mailchimp, SHARED)] == ["First"]


async def test_two_contacts_left_at_one_address_are_settled_on_the_owner(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    """Before the owner rule both members were written at a shared address, the last one
    winning: the next full comparison writes the owner and drops the other contact."""
    list_id = mailchimp.add_list()
    first, second = await two_members_sharing_an_address(api)
    integration = await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)
    async with db.transaction() as session:  # the state the old sync left
        ids = dict(
            (
                await session.execute(
                    select(Member.public_id, Member.id).where(
                        Member.public_id.in_([first["id"], second["id"]])
                    )
                )
            ).all()
        )
        [owned] = await session.scalars(select(MarketingContact))
        session.add(
            MarketingContact(
                integration_id=owned.integration_id,
                member_id=ids[second["id"]],
                email=owned.email,
                status="subscribed",
                content_hash="written-last",
            )
        )
    mailchimp.set_status(list_id, SHARED, "subscribed")
    asked = await api.post(
        f"/api/v1/integrations/{integration['id']}/marketing/sync", {"full": True}
    )
    assert asked.status_code == 202, asked.text
    await tick(db, hub)

    async with db.transaction(read_only=True) as session:
        contacts = list(await session.scalars(select(MarketingContact)))
    assert [(c.member_id, c.status) for c in contacts] == [(ids[first["id"]], "subscribed")]
    assert sent_for(mailchimp, SHARED)[-1]["merge_fields"]["FNAME"] == "First"


async def test_a_profile_update_of_a_shared_address_renames_its_owner_only(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    mailchimp: FakeMailchimp,
) -> None:
    list_id = mailchimp.add_list()
    first, second = await two_members_sharing_an_address(api)
    integration = await create_mailchimp(api, mailchimp, list_id)
    await tick(db, hub)
    body = mailchimp.webhook_body("profile", list_id, SHARED, FNAME="Renamed")

    received = await http.post(
        f"/api/v1/inbound/{integration['id']}",
        params={"token": WEBHOOK_SECRET},
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    await tick(db, hub)

    assert received.status_code == 200, received.text
    names = [
        (await api.get(f"/api/v1/members/{m['id']}")).json()["first_name"] for m in (first, second)
    ]
    assert names == ["Renamed", "Second"]
