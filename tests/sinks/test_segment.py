"""Segment through an event sink: identify and track calls in /v1/batch requests within
Segment's limits, messageId equal to our event id, and consent honoured."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from memberhub.alerts.models import AlertType
from memberhub.alerts.service import raise_alert
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.providers.segment import MAX_BATCH_BYTES, MAX_CALL_BYTES
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from tests.fakes.segment import FakeSegment
from tests.sinks.conftest import (
    ANALYTICS,
    award,
    create_sink,
    emit_earnings,
    event_ids,
    forward,
    segment_integration,
)
from tests.support import ApiClient


async def test_a_members_events_arrive_as_identify_and_track_with_our_event_ids(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    await create_sink(api, integration["id"])
    member = await api.create_member(first_name="Ana", consent=ANALYTICS)
    await award(api, member["id"], 120)
    await award(api, member["id"], 30)

    assert await forward(db, hub) == 3
    calls = segment.calls_for(member["id"])
    [created] = await event_ids(api, member["id"], "member.created")
    earned = await event_ids(api, member["id"], "points.earned")
    tracks = [call for call in calls if call["type"] == "track"]
    assert [call["event"] for call in tracks] == [
        "Member Created",
        "Points Earned",
        "Points Earned",
    ]
    assert [call["messageId"] for call in tracks] == [created, *earned]
    assert [call["properties"]["points"] for call in tracks[1:]] == [120, 30]
    identifies = [call for call in calls if call["type"] == "identify"]
    assert identifies[0]["messageId"] == f"{created}-identify"
    assert identifies[-1]["traits"]["points_balance"] == 150
    assert set(identifies[-1]["traits"]) == {"tier", "status", "points_balance", "member_since"}
    # Nothing personal leaves: no email or name in any call.
    sent = json.dumps(segment.accepted)
    assert member["email"] not in sent
    assert "Ana" not in sent
    assert segment.dropped == []


async def test_an_alert_about_a_member_is_never_sent(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    await create_sink(api, integration["id"], ["*"])
    member = await api.create_member(consent=ANALYTICS)
    await forward(db, hub)
    before = len(segment.tracks())
    async with db.transaction() as session:
        row = await session.scalar(select(Member).where(Member.public_id == member["id"]))
        assert row is not None
        await raise_alert(
            session,
            AlertType.LARGE_REDEMPTION,
            member=row,
            dedupe_key="large",
            message=f"{member['id']} redeemed 5000 points (over 1000).",
            now=utcnow(),
        )
    await award(api, member["id"], 10)
    await forward(db, hub)
    # The alert is a staff notice (its text is for staff): only the member's own doing goes.
    assert [call["event"] for call in segment.tracks()[before:]] == ["Points Earned"]


async def test_members_without_analytics_consent_produce_no_request(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    await create_sink(api, integration["id"])
    members = [await api.create_member(consent={"crm": True}) for _ in range(3)]
    for member in members:
        await award(api, member["id"], 10)

    assert await forward(db, hub) == 0
    assert segment.requests == 0
    sink = (await api.get("/api/v1/event-sinks")).json()["data"][0]
    assert sink["events_skipped"] == 6
    assert sink["lag"] == 0


async def test_withdrawing_consent_stops_events_and_files_a_deletion(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    await create_sink(api, integration["id"])
    member = await api.create_member(consent=ANALYTICS)
    await award(api, member["id"], 10)
    await forward(db, hub)
    before = len(segment.calls_for(member["id"]))
    assert before > 0

    withdrawn = await api.patch(
        f"/api/v1/members/{member['id']}", {"consent": {"analytics": False}}
    )
    assert withdrawn.status_code == 200, withdrawn.text
    await award(api, member["id"], 99)
    await forward(db, hub)

    assert len(segment.calls_for(member["id"])) == before
    [regulation] = segment.regulations
    assert regulation["subjectIds"] == [member["id"]]
    assert regulation["regulationType"] == "SUPPRESS_WITH_DELETE"
    assert regulation["subjectType"] == "USER_ID"


@pytest.mark.parametrize("forwarded_between", [False, True])
async def test_an_event_from_while_consent_was_withdrawn_is_never_sent(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    segment: FakeSegment,
    forwarded_between: bool,
) -> None:
    integration = await segment_integration(api, segment, deletion=False)
    await create_sink(api, integration["id"])
    member = await api.create_member(consent=ANALYTICS)
    assert await forward(db, hub) >= 1
    path = f"/api/v1/members/{member['id']}"
    assert (await api.patch(path, {"consent": {"analytics": False}})).status_code == 200
    await award(api, member["id"], 77, reason="earned while analytics was withdrawn")
    if forwarded_between:  # the withdrawal and the event in one window, the grant in the next
        await forward(db, hub)
    assert (await api.patch(path, {"consent": {"analytics": True}})).status_code == 200
    await award(api, member["id"], 5, reason="earned with consent again")
    await forward(db, hub)
    withdrawn_period, consented_again = await event_ids(api, member["id"], "points.earned")
    sent = {call["messageId"] for call in segment.calls_for(member["id"])}
    assert withdrawn_period not in sent
    assert consented_again in sent


async def test_an_event_before_a_withdrawal_is_not_sent_after_it(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment, deletion=False)
    await create_sink(api, integration["id"])
    member = await api.create_member(consent=ANALYTICS)
    await award(api, member["id"], 10)
    path = f"/api/v1/members/{member['id']}"
    # Withdrawn, then given again, before the worker forwarded the first earning.
    assert (await api.patch(path, {"consent": {"analytics": False}})).status_code == 200
    assert (await api.patch(path, {"consent": {"analytics": True}})).status_code == 200
    await forward(db, hub)
    [earned] = await event_ids(api, member["id"], "points.earned")
    assert earned not in {call["messageId"] for call in segment.calls_for(member["id"])}


async def test_a_deletion_refused_for_good_is_logged_and_holds_nothing_up(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    await create_sink(api, integration["id"])
    leaving = await api.create_member(consent=ANALYTICS)
    staying = await api.create_member(consent=ANALYTICS)
    await forward(db, hub)
    withdrawn = await api.patch(
        f"/api/v1/members/{leaving['id']}", {"consent": {"analytics": False}}
    )
    assert withdrawn.status_code == 200, withdrawn.text
    await award(api, staying["id"], 10)
    before = len(segment.calls_for(staying["id"]))

    segment.answer_next(None, 400)  # the batch goes; the regulation is refused as a request
    await forward(db, hub)

    assert len(segment.calls_for(staying["id"])) > before
    assert segment.regulations == []
    sink = (await api.get("/api/v1/event-sinks")).json()["data"][0]
    assert (sink["lag"], sink["failures"], sink["deletions_requested"]) == (0, 0, 0)


async def test_a_deletion_refused_for_its_credentials_is_tried_again(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    # A token without the scope may be fixed: nothing is dropped meanwhile.
    integration = await segment_integration(api, segment)
    await create_sink(api, integration["id"])
    leaving = await api.create_member(consent=ANALYTICS)
    await forward(db, hub)
    withdrawn = await api.patch(
        f"/api/v1/members/{leaving['id']}", {"consent": {"analytics": False}}
    )
    assert withdrawn.status_code == 200, withdrawn.text

    segment.answer_next(403)
    await forward(db, hub)

    sink = (await api.get("/api/v1/event-sinks")).json()["data"][0]
    assert sink["failures"] == 1
    assert "403" in sink["last_error"]
    assert segment.regulations == []


async def test_without_a_public_api_token_no_deletion_is_asked(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment, deletion=False)
    await create_sink(api, integration["id"])
    member = await api.create_member(consent=ANALYTICS)
    await api.patch(f"/api/v1/members/{member['id']}", {"consent": {"analytics": False}})
    await forward(db, hub)
    assert segment.regulations == []
    sink = (await api.get("/api/v1/event-sinks")).json()["data"][0]
    assert sink["deletions_requested"] == 0
    assert sink["failures"] == 0


async def test_a_large_backlog_goes_in_full_batches_within_segments_limits(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    async with db.transaction() as session:
        member_row = await session.scalar(select(Member).where(Member.public_id == member["id"]))
        assert member_row is not None
    # Long reasons make each call about 1.5 KB: the batch size, not a count, is the limit.
    reason = "r" * 1200
    await emit_earnings(db, member["id"], 1500, utcnow(), reason=lambda _i: reason)

    sent = 0
    for _ in range(5):
        sent += await forward(db, hub)
    assert sent == 1500
    assert len(segment.tracks()) == 1500
    batches = segment.batches
    assert all(batch.size <= MAX_BATCH_BYTES for batch in batches)
    assert all(
        len(json.dumps(call, separators=(",", ":")).encode()) <= MAX_CALL_BYTES
        for batch in batches
        for call in batch.calls
    )
    total = sum(batch.size for batch in batches)
    # The fewest requests the batch limit allows: every batch but the last one per window
    # of the feed is full within one call's size.
    assert len(batches) <= -(-total // (MAX_BATCH_BYTES - 2_000)) + 2
    # In commit order.
    balances = [call["properties"]["balance_after"] for call in segment.tracks()]
    assert balances == list(range(1500))


async def test_a_call_larger_than_32_kb_is_refused_alone_and_logged(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    now = utcnow()
    await emit_earnings(db, member["id"], 3, now, reason=lambda i: "x" * (40_000 if i == 1 else 10))
    assert await forward(db, hub) == 2
    assert [c["properties"]["balance_after"] for c in segment.tracks()] == [0, 2]
    shown = (await api.get(f"/api/v1/event-sinks/{sink['id']}")).json()
    assert shown["events_refused"] == 1
    assert shown["events_sent"] == 2
    log = (await api.get(f"/api/v1/event-sinks/{sink['id']}/deliveries")).json()["data"]
    assert log[0]["events_refused"] == 1
    assert log[0]["status"] == "succeeded"
