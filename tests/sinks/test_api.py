"""The event sink API: bound to an analytics integration, validated, replayable, with a
delivery log and a dry run that writes nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from memberhub.events.models import Event
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.fakes.segment import FakeSegment
from tests.sinks.conftest import (
    ANALYTICS,
    award,
    create_integration,
    create_sink,
    forward,
    segment_integration,
)
from tests.support import ApiClient

SINKS = "/api/v1/event-sinks"


async def test_a_sink_is_created_shown_changed_and_deleted(
    api: ApiClient, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(
        api, integration["id"], ["points.*"], mapping={"points.earned": "Loyalty Points Earned"}
    )
    assert sink["provider"] == "segment"
    assert sink["consent_purpose"] == "analytics"
    assert sink["mapping"]["points.earned"] == "Loyalty Points Earned"
    assert sink["mapping"]["points.redeemed"] == "Points Redeemed"  # the provider's default
    assert (sink["lag"], sink["events_sent"], sink["failures"]) == (0, 0, 0)

    changed = await api.patch(f"{SINKS}/{sink['id']}", {"name": "Renamed", "enabled": False})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["name"], changed.json()["enabled"]) == ("Renamed", False)
    assert (await api.get(f"{SINKS}/{sink['id']}")).json()["name"] == "Renamed"
    assert (await api.delete(f"{SINKS}/{sink['id']}")).status_code == 204
    assert (await api.get(f"{SINKS}/{sink['id']}")).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "event_types": ["points.*"], "integration_id": None},
        {"name": "", "event_types": ["points.*"]},
        {"name": "x", "event_types": []},
        {"name": "x", "event_types": ["Points!"]},
        {"name": "x", "event_types": ["points.*", "points.earnd"]},
        {"name": "x", "event_types": ["*"], "mapping": {"no.such_event": "X"}},
        {"name": "x", "event_types": ["*"], "mapping": {"points.earned": ""}},
        {"name": "x", "event_types": ["*"], "request_deletion": "yes"},
        {"name": "x", "event_types": ["*"], "surprise": 1},
    ],
    ids=[
        "no-integration",
        "empty-name",
        "no-types",
        "bad-type",
        "type-of-no-event",
        "unknown-mapped-type",
        "empty-vendor-name",
        "non-bool",
        "unknown-field",
    ],
)
async def test_bad_input_is_refused_and_creates_nothing(
    api: ApiClient, segment: FakeSegment, body: dict[str, Any]
) -> None:
    integration = await segment_integration(api, segment)
    body = {"integration_id": integration["id"], **body}
    if body["integration_id"] is None:
        del body["integration_id"]
    response = await api.post(SINKS, body)
    assert response.status_code == 422, response.text
    assert "error" in response.json()
    assert (await api.get(SINKS)).json()["data"] == []


async def test_a_change_to_event_types_matching_no_event_is_refused_and_changes_nothing(
    api: ApiClient, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.*", "member.*", "points.*"])
    assert sink["event_types"] == ["member.*", "points.*"]
    # A misspelt name would never match an event: the sink would silently send nothing.
    refused = await api.patch(f"{SINKS}/{sink['id']}", {"event_types": ["points.earnd"]})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["details"]["unknown"] == ["points.earnd"]
    assert (await api.get(f"{SINKS}/{sink['id']}")).json()["event_types"] == [
        "member.*",
        "points.*",
    ]


async def test_an_integration_that_receives_no_events_cannot_have_a_sink(api: ApiClient) -> None:
    other = await create_integration(
        api,
        {
            "provider": "http",
            "name": "Partner",
            "config": {"base_url": "http://127.0.0.1:9", "auth": "none"},
        },
    )
    response = await api.post(
        SINKS, {"integration_id": other["id"], "name": "x", "event_types": ["*"]}
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "INTEGRATION_NOT_AN_ANALYTICS_SINK"
    missing = await api.post(
        SINKS, {"integration_id": "int_missing", "name": "x", "event_types": ["*"]}
    )
    assert missing.status_code == 404


async def test_a_sink_receives_only_events_committed_after_it_was_created(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    member = await api.create_member(consent=ANALYTICS)
    await award(api, member["id"], 10)
    integration = await segment_integration(api, segment)
    await create_sink(api, integration["id"], ["points.earned"])
    await award(api, member["id"], 5)
    assert await forward(db, hub) == 1
    assert [c["properties"]["points"] for c in segment.tracks()] == [5]


async def test_a_replay_sends_a_past_range_again_and_segment_deduplicates_it(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    since = utcnow() - timedelta(seconds=1)
    for points in (1, 2, 3):
        await award(api, member["id"], points)
    await forward(db, hub)
    accepted = len(segment.accepted)
    until = utcnow() + timedelta(seconds=1)

    body = {"since": since.isoformat(), "until": until.isoformat()}
    replay = await api.post(f"{SINKS}/{sink['id']}/replay", body)
    assert replay.status_code == 202, replay.text
    assert replay.json()["replay"] is not None
    again = await api.post(f"{SINKS}/{sink['id']}/replay", body)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "REPLAY_UNDER_WAY"

    assert await forward(db, hub) == 3
    assert segment.duplicates >= 3
    assert len(segment.accepted) == accepted
    shown = (await api.get(f"{SINKS}/{sink['id']}")).json()
    assert shown["replay"] is None
    log = (await api.get(f"{SINKS}/{sink['id']}/deliveries")).json()["data"]
    assert log[0]["replay"] is True
    assert log[0]["events_sent"] == 3
    assert log[1]["replay"] is False


async def test_a_replay_never_reaches_before_the_sink_was_created(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    """A replay sends again what the sink passed: events committed before it was created
    were never its to send, whatever range is asked for."""
    member = await api.create_member(consent=ANALYTICS)
    since = utcnow() - timedelta(seconds=1)
    await award(api, member["id"], 10)  # before the sink
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    await award(api, member["id"], 5)
    await forward(db, hub)
    assert [c["properties"]["points"] for c in segment.tracks()] == [5]

    until = utcnow() + timedelta(seconds=1)
    body = {"since": since.isoformat(), "until": until.isoformat()}
    replay = await api.post(f"{SINKS}/{sink['id']}/replay", body)
    assert replay.status_code == 202, replay.text
    accepted = len(segment.accepted)
    assert await forward(db, hub) == 1
    # The 5 again (Segment deduplicates it), never the 10.
    assert len(segment.accepted) == accepted
    assert [c["properties"]["points"] for c in segment.tracks()] == [5]

    # A range wholly before the sink: refused, with the reason.
    before = {"since": since.isoformat(), "until": (since + timedelta(microseconds=1)).isoformat()}
    async with db.transaction() as session:
        await session.execute(
            update(Event)
            .where(Event.type == "points.earned", Event.data["points"].as_integer() == 10)
            .values(occurred_at=since)
        )
    refused = await api.post(f"{SINKS}/{sink['id']}/replay", before)
    assert refused.status_code == 422, refused.text
    assert "before the sink was created" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        {"since": "2026-01-01T00:00:00Z"},
        {"since": "yesterday", "until": "2026-01-01T00:00:00Z"},
        {"since": "1990-01-01T00:00:00Z", "until": "1990-01-02T00:00:00Z"},
    ],
    ids=["reversed", "half", "not-a-time", "nothing-there"],
)
async def test_a_bad_replay_is_refused(
    api: ApiClient, segment: FakeSegment, body: dict[str, str]
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"])
    response = await api.post(f"{SINKS}/{sink['id']}/replay", body)
    assert response.status_code == 422, response.text
    assert (await api.get(f"{SINKS}/{sink['id']}")).json()["replay"] is None


async def test_a_dry_run_shows_segments_batch_and_writes_nothing(
    api: ApiClient, db: Database, hub: IntegrationHub, segment: FakeSegment
) -> None:
    integration = await segment_integration(api, segment)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    refusing = await api.create_member()
    await award(api, member["id"], 8)
    await award(api, refusing["id"], 8)

    dry = await api.post(f"{SINKS}/{sink['id']}/dry-run", {})
    assert dry.status_code == 200, dry.text
    plan = dry.json()
    assert (plan["events_read"], plan["events_to_send"], plan["events_skipped"]) == (4, 1, 1)
    [request] = plan["requests"]
    assert request["path"] == "/v1/batch"
    types = [call["type"] for call in request["body"]["batch"]]
    assert types == ["identify", "track"]
    assert request["body"]["batch"][1]["messageId"] == request["events"][0]
    assert segment.requests == 0
    assert (await api.get(f"{SINKS}/{sink['id']}")).json()["events_sent"] == 0
    bad = await api.post(f"{SINKS}/{sink['id']}/dry-run", {"limit": 0})
    assert bad.status_code == 422
    half = await api.post(f"{SINKS}/{sink['id']}/dry-run", {"since": "2026-01-01T00:00:00Z"})
    assert half.status_code == 422


async def test_unknown_sinks_are_not_found(api: ApiClient) -> None:
    responses = [
        await api.get(f"{SINKS}/snk_missing"),
        await api.patch(f"{SINKS}/snk_missing", {"name": "x"}),
        await api.delete(f"{SINKS}/snk_missing"),
        await api.get(f"{SINKS}/snk_missing/deliveries"),
        await api.post(f"{SINKS}/snk_missing/dry-run", {}),
    ]
    for response in responses:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "EVENT_SINK_NOT_FOUND"
