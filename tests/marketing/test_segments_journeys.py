"""Segments defined in memberhub become static segments holding exactly the members the
conditions select in the database; journey rules start a Customer Journey step once per
member and rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import delete, insert, select, update

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.ids import new_public_id
from memberhub.marketing.models import MarketingSegment
from memberhub.members.models import Member
from memberhub.points.models import PointAccount
from tests.fakes.mailchimp import FakeMailchimp
from tests.marketing.conftest import create_mailchimp, status, tick
from tests.support import ApiClient

LAPSING = "Points 500+, inactive 60 days"
# A rule: the Customer Journey step 77/5 when a member reaches gold.
GOLD_WELCOME = {
    "key": "gold-welcome",
    "trigger": "tier_reached",
    "tier": "gold",
    "journey_id": "77",
    "step_id": "5",
}


async def seed_members(db: Database, now: datetime) -> None:
    """Members across the segment's edges: balances around 500, last activity around 60
    days ago (or none, since joining 200 or 10 days ago), with and without consent."""
    balances = [0, 499, 500, 501, 900, 2000]
    activity = [None, 10, 59, 61, 120]
    rows = []
    for b, balance in enumerate(balances):
        for a, days in enumerate(activity):
            for consent in (True, False):
                rows.append((balance, days, consent, 200 if (b + a) % 2 else 10))
    async with db.transaction() as session:
        for n, (balance, days, consent, joined_days) in enumerate(rows):
            public_id = new_public_id("mem")
            await session.execute(
                insert(Member).values(
                    public_id=public_id,
                    email=f"seg{n}@example.com",
                    email_normalized=f"seg{n}@example.com",
                    status="active",
                    consent_marketing_email=consent,
                    custom_fields={},
                    external_ids={},
                    created_at=now - timedelta(days=joined_days),
                    updated_at=now,
                )
            )
            member_id = await session.scalar(select(Member.id).where(Member.public_id == public_id))
            await session.execute(
                insert(PointAccount).values(
                    member_id=member_id,
                    current=balance,
                    last_activity_at=now - timedelta(days=days) if days is not None else None,
                    updated_at=now,
                )
            )


async def lapsing_in_database(db: Database, now: datetime) -> set[str]:
    """The members the segment means, read plainly from the tables."""
    async with db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(Member, PointAccount).outerjoin(
                PointAccount, PointAccount.member_id == Member.id
            )
        )
        found = set()
        for member, account in rows:
            balance = account.current if account is not None else 0
            last = (account.last_activity_at if account is not None else None) or (
                member.member_since or member.created_at
            )
            if (
                member.deleted_at is None
                and member.consent_marketing_email
                and balance >= 500
                and last <= now - timedelta(days=60)
            ):
                assert member.email is not None
                found.add(member.email.lower())
    return found


async def test_a_segment_holds_exactly_the_members_the_database_query_finds(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    now = utcnow()
    await seed_members(db, now)
    integration = await create_mailchimp(
        api,
        mailchimp,
        list_id,
        segments=[
            {
                "key": "lapsing",
                "name": LAPSING,
                "conditions": {"points_min": 500, "inactive_days": 60},
            }
        ],
    )

    await tick(db, hub)
    first = mailchimp.segment_members(list_id, LAPSING)
    expected_first = await lapsing_in_database(db, utcnow())
    # Ana comes back (activity today); Bo's balance crosses 500 after a quiet quarter.
    ana, bo = sorted(expected_first)[0], "seg1@example.com"
    async with db.transaction() as session:
        ana_id = await session.scalar(select(Member.id).where(Member.email == ana))
        bo_id = await session.scalar(select(Member.id).where(Member.email == bo))
        await session.execute(
            update(PointAccount)
            .where(PointAccount.member_id == ana_id)
            .values(last_activity_at=utcnow())
        )
        await session.execute(
            update(PointAccount)
            .where(PointAccount.member_id == bo_id)
            .values(current=900, last_activity_at=utcnow() - timedelta(days=90))
        )
        await session.execute(
            update(Member).where(Member.id == bo_id).values(consent_marketing_email=True)
        )
    asked = await api.post(f"/api/v1/integrations/{integration['id']}/marketing/sync", {})
    assert asked.status_code == 202, asked.text
    requests_before = len(mailchimp.writes())
    await tick(db, hub)
    second = mailchimp.segment_members(list_id, LAPSING)
    expected_second = await lapsing_in_database(db, utcnow())
    segment_calls = [r for r in mailchimp.writes()[requests_before:] if "/segments/" in r.path]

    assert expected_first  # the seed selects someone, and leaves others out
    assert len(expected_first) < 60
    assert first == expected_first
    assert ana not in expected_second
    assert bo in expected_second
    assert second == expected_second
    assert len(segment_calls) == 1  # one add and one removal in one call
    assert segment_calls[0].body == {"members_to_add": [bo], "members_to_remove": [ana]}
    shown = await status(api, integration["id"])
    assert shown["segments"][0]["members"] == len(expected_second)
    assert shown["segments"][0]["remote_id"] is not None


async def test_a_segment_whose_creation_answer_was_lost_is_found_by_name(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    member = await api.create_member(consent={"marketing_email": True})
    integration = await create_mailchimp(
        api, mailchimp, list_id, segments=[{"key": "all", "name": "Everyone"}]
    )
    await tick(db, hub)
    async with db.transaction() as session:  # as if the run died before recording it
        await session.execute(delete(MarketingSegment))
    asked = await api.post(f"/api/v1/integrations/{integration['id']}/marketing/sync", {})
    assert asked.status_code == 202, asked.text
    await tick(db, hub)

    shown = await status(api, integration["id"])
    assert shown["failures"] == 0, shown["last_error"]
    assert mailchimp.segment_members(list_id, "Everyone") == {member["email"].lower()}
    assert shown["segments"][0]["members"] == 1


async def make_tiers(api: ApiClient) -> None:
    for code, rank in (("silver", 1), ("gold", 2)):
        created = await api.post(
            "/api/v1/tiers",
            {"code": code, "name": code.title(), "rank": rank, "threshold": rank * 1000},
        )
        assert created.status_code == 201, created.text


async def assign(api: ApiClient, member_id: str, tier: str) -> None:
    response = await api.post(
        "/api/v1/tiers/assign", {"member_id": member_id, "tier_code": tier, "reason": "test"}
    )
    assert response.status_code == 200, response.text


async def test_a_segment_deleted_in_mailchimp_is_made_again_and_holds_no_journey_up(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    mailchimp.add_journey(77, list_id, {5})
    await make_tiers(api)
    first = await api.create_member(consent={"marketing_email": True})
    await create_mailchimp(
        api,
        mailchimp,
        list_id,
        segments=[{"key": "everyone", "name": "Everyone", "conditions": {}}],
        journeys=[GOLD_WELCOME],
    )
    start = utcnow()
    await tick(db, hub, now=start)
    assert mailchimp.segment_members(list_id, "Everyone") == {first["email"].lower()}
    mailchimp.delete_segment(list_id, "Everyone")
    second = await api.create_member(consent={"marketing_email": True})
    await assign(api, first["id"], "gold")
    await tick(db, hub, now=start + timedelta(hours=1))
    assert [t.email_address for t in mailchimp.triggers] == [first["email"]]
    assert mailchimp.segment_members(list_id, "Everyone") == {
        first["email"].lower(),
        second["email"].lower(),
    }


async def test_a_tier_journey_does_not_start_for_a_member_no_longer_in_the_tier(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    mailchimp.add_journey(77, list_id, {5})
    await make_tiers(api)
    member = await api.create_member(consent={"marketing_email": True})
    await create_mailchimp(
        api,
        mailchimp,
        list_id,
        journeys=[GOLD_WELCOME],
    )
    await tick(db, hub)
    await assign(api, member["id"], "gold")  # by mistake...
    await assign(api, member["id"], "silver")  # ...put right before the worker's pass
    await tick(db, hub)
    assert mailchimp.triggers == []
    await assign(api, member["id"], "gold")  # reached for real: the rule fires now
    await tick(db, hub)
    assert [t.email_address for t in mailchimp.triggers] == [member["email"]]


async def test_a_tier_upgrade_journey_fires_once_per_member(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    mailchimp.add_journey(77, list_id, {5})
    await make_tiers(api)
    keen = await api.create_member(consent={"marketing_email": True})
    quiet = await api.create_member(consent={"marketing_email": False})
    integration = await create_mailchimp(
        api,
        mailchimp,
        list_id,
        journeys=[GOLD_WELCOME],
    )
    await tick(db, hub)
    await assign(api, keen["id"], "silver")
    await tick(db, hub)
    after_silver = list(mailchimp.triggers)
    await assign(api, keen["id"], "gold")
    await assign(api, quiet["id"], "gold")
    await tick(db, hub)
    after_gold = list(mailchimp.triggers)
    await assign(api, keen["id"], "silver")
    await tick(db, hub)
    await assign(api, keen["id"], "gold")  # upgraded again: the rule fired already
    await tick(db, hub)

    assert after_silver == []
    assert [t.email_address for t in after_gold] == [keen["email"]]
    assert (after_gold[0].journey_id, after_gold[0].step_id) == (77, 5)
    assert mailchimp.triggers == after_gold
    journeys = (await status(api, integration["id"]))["journeys"]
    assert journeys == {"sent": 1, "skipped": 1}  # the member without consent: never


async def test_points_expiring_journey_fires_for_500_points_within_30_days(
    api: ApiClient, db: Database, hub: IntegrationHub, mailchimp: FakeMailchimp
) -> None:
    list_id = mailchimp.add_list()
    mailchimp.add_journey(90, list_id, {1})
    many = await api.create_member(consent={"marketing_email": True})
    few = await api.create_member(consent={"marketing_email": True})
    await create_mailchimp(
        api,
        mailchimp,
        list_id,
        journeys=[
            {
                "key": "expiring",
                "trigger": "points_expiring",
                "min_points": 500,
                "within_days": 30,
                "journey_id": "90",
                "step_id": "1",
            }
        ],
    )
    await tick(db, hub)
    soon = (datetime.now(UTC) + timedelta(days=20)).isoformat()
    for member, points in ((many, 300), (many, 250), (few, 400)):
        awarded = await api.post(
            "/api/v1/points/award",
            {"member_id": member["id"], "points": points, "reason": "gift", "expires_at": soon},
        )
        assert awarded.status_code == 201, awarded.text

    for _ in range(3):  # the notice job, then the sync that reads its events
        await tick(db, hub)

    assert [t.email_address for t in mailchimp.triggers] == [many["email"]]


async def test_the_marketing_endpoints_need_an_api_key(http: httpx.AsyncClient) -> None:
    """Unlike the inbound endpoint Mailchimp posts to, which the URL's secret guards."""
    response = await http.get("/api/v1/integrations/int_x/marketing")
    assert response.status_code == 401
