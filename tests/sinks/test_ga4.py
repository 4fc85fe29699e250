"""GA4 through an event sink: Measurement Protocol requests of one member's events, at most
25 each, recommended event names, user and client ids, consent fields; the validation
server behind the connection test and dry runs."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.providers.ga4 import client_id_for
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from tests.fakes.ga4 import FakeGa4, validate
from tests.sinks.conftest import (
    ANALYTICS,
    award,
    create_sink,
    emit_earnings,
    forward,
    ga4_integration,
)
from tests.support import ApiClient


async def test_events_reach_ga4_with_recommended_names_and_the_member_as_user(
    api: ApiClient, db: Database, hub: IntegrationHub, ga4: FakeGa4
) -> None:
    integration = await ga4_integration(api, ga4)
    await create_sink(api, integration["id"])
    member = await api.create_member(consent={"analytics": True, "profiling": True})
    await award(api, member["id"], 75)
    redeem = await api.post(
        "/api/v1/points/redeem", {"member_id": member["id"], "points": 25, "reason": "mug"}
    )
    assert redeem.status_code == 201, redeem.text

    assert await forward(db, hub) == 3
    assert ga4.dropped == []
    [body] = ga4.collected
    assert body["user_id"] == member["id"]
    assert body["client_id"] == client_id_for(member["id"])
    assert body["consent"] == {"ad_user_data": "DENIED", "ad_personalization": "GRANTED"}
    assert body["user_properties"]["points_balance"] == {"value": 50}
    names = [event["name"] for event in body["events"]]
    assert names == ["sign_up", "earn_virtual_currency", "spend_virtual_currency"]
    earn, spend = body["events"][1]["params"], body["events"][2]["params"]
    assert (earn["virtual_currency_name"], earn["value"]) == ("points", 75)
    assert (spend["value"], spend["item_name"]) == (25, "mug")
    assert validate(body) == []


async def test_a_stored_client_id_joins_the_browser_session(
    api: ApiClient, db: Database, hub: IntegrationHub, ga4: FakeGa4
) -> None:
    integration = await ga4_integration(api, ga4)
    await create_sink(api, integration["id"], ["points.*"])
    member = await api.create_member(
        consent=ANALYTICS, external_ids={"ga4_client_id": "1234567890.1700000000"}
    )
    await award(api, member["id"], 5)
    await forward(db, hub)
    [body] = ga4.collected
    assert body["client_id"] == "1234567890.1700000000"
    assert body["consent"]["ad_personalization"] == "DENIED"


async def test_a_member_with_many_events_gets_requests_of_at_most_25(
    api: ApiClient, db: Database, hub: IntegrationHub, ga4: FakeGa4
) -> None:
    integration = await ga4_integration(api, ga4)
    await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    now = utcnow()
    await emit_earnings(db, member["id"], 60, now, points=lambda i: i + 1)
    assert await forward(db, hub) == 60
    assert [len(body["events"]) for body in ga4.collected] == [25, 25, 10]
    values = [e["params"]["value"] for e in ga4.events_for(member["id"])]
    assert values == list(range(1, 61))


async def test_events_older_than_ga4_takes_are_refused_not_sent_to_be_dropped(
    api: ApiClient, db: Database, hub: IntegrationHub, ga4: FakeGa4
) -> None:
    """GA4 silently drops events dated more than 72 hours back (a sink that was down, or
    a replay): they are refused, and the delivery log says so."""
    integration = await ga4_integration(api, ga4)
    sink = await create_sink(api, integration["id"], ["points.earned"])
    member = await api.create_member(consent=ANALYTICS)
    await emit_earnings(db, member["id"], 2, utcnow() - timedelta(hours=73))
    await emit_earnings(db, member["id"], 1, utcnow() - timedelta(hours=70))
    assert await forward(db, hub) == 1
    [body] = ga4.collected
    assert len(body["events"]) == 1
    [window] = (await api.get(f"/api/v1/event-sinks/{sink['id']}/deliveries")).json()["data"]
    assert (window["events_sent"], window["events_refused"]) == (1, 2)


async def test_members_without_analytics_consent_produce_no_ga4_request(
    api: ApiClient, db: Database, hub: IntegrationHub, ga4: FakeGa4
) -> None:
    integration = await ga4_integration(api, ga4)
    await create_sink(api, integration["id"])
    member = await api.create_member(consent={"email": True, "profiling": True})
    await award(api, member["id"], 10)
    consenting = await api.create_member(consent=ANALYTICS)
    await api.patch(f"/api/v1/members/{consenting['id']}", {"consent": {"analytics": False}})
    await award(api, consenting["id"], 10)

    assert await forward(db, hub) == 0
    assert ga4.collect_requests == 0
    assert ga4.debug_requests == 0


async def test_the_connection_test_asks_the_validation_server(api: ApiClient, ga4: FakeGa4) -> None:
    integration = await ga4_integration(api, ga4)
    result = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    assert result.status_code == 200, result.text
    assert result.json()["ok"] is True
    assert ga4.debug_requests == 1
    assert ga4.collect_requests == 0


async def test_the_silent_endpoint_drops_what_the_validation_server_explains(
    ga4: FakeGa4,
) -> None:
    """The fake behaves as GA4 does: 204 for a bad payload, messages only in debug."""
    import httpx

    bad = {"client_id": "1.2", "events": [{"name": "_bad", "params": {}}] * 30}
    query = {"measurement_id": "G-TEST1234", "api_secret": "ga4-api-secret-0001"}
    async with httpx.AsyncClient(base_url=ga4.url) as client:
        silent = await client.post("/mp/collect", params=query, json=bad)
        debug = await client.post("/debug/mp/collect", params=query, json=bad)
    assert silent.status_code == 204
    assert ga4.collected == []
    codes = {m["validationCode"] for m in debug.json()["validationMessages"]}
    assert codes == {"EXCEEDED_MAX_ENTITIES", "NAME_INVALID"}


async def test_a_mapping_to_names_ga4_refuses_is_refused(api: ApiClient, ga4: FakeGa4) -> None:
    integration = await ga4_integration(api, ga4)
    for name in ("Points Earned", "session_start", "ga_points", "x" * 41):
        response = await api.post(
            "/api/v1/event-sinks",
            {
                "integration_id": integration["id"],
                "name": "GA4",
                "event_types": ["points.*"],
                "mapping": {"points.earned": name},
            },
        )
        assert response.status_code == 422, (name, response.text)
    assert (await api.get("/api/v1/event-sinks")).json()["data"] == []


async def test_a_dry_run_validates_what_it_would_send_and_sends_nothing(
    api: ApiClient, db: Database, hub: IntegrationHub, ga4: FakeGa4
) -> None:
    integration = await ga4_integration(api, ga4)
    sink = await create_sink(api, integration["id"], ["points.*"])
    member = await api.create_member(consent=ANALYTICS)
    await award(api, member["id"], 40)
    async with db.transaction() as session:
        await session.execute(
            update(Member).where(Member.public_id == member["id"]).values(tier="gold")
        )
    dry = await api.post(f"/api/v1/event-sinks/{sink['id']}/dry-run", {"validate_requests": True})
    assert dry.status_code == 200, dry.text
    plan = dry.json()
    assert plan["events_to_send"] == 1
    [request] = plan["requests"]
    assert request["path"] == "/mp/collect"
    assert request["body"]["events"][0]["name"] == "earn_virtual_currency"
    assert request["body"]["user_properties"]["tier"] == {"value": "gold"}
    assert request["validation_messages"] == []
    assert ga4.collect_requests == 0
    assert ga4.debug_requests == 1
    after = (await api.get(f"/api/v1/event-sinks/{sink['id']}")).json()
    assert after["events_sent"] == 0
    assert after["lag"] >= 1
