"""Webhook endpoints through the API: registration and its validation (SSRF included),
organisation scope and roles, fan-out, test events, secret rotation, the delivery log,
retries, recovery, automatic disabling, and the operational surface (audit, metrics)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from memberhub.app import create_app
from memberhub.auth.roles import Role
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox, SecretUnreadable
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.delivery import fan_out
from memberhub.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from tests.conftest import issue_key
from tests.fakes.webhook_receiver import Received, Reply, WebhookReceiver, always
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, delivery_loop

ENDPOINTS = "/api/v1/webhook-endpoints"
# A public address literal: accepted under any policy without a DNS lookup; nothing is ever
# sent to it by these tests (no delivery loop runs against it).
PUBLIC_URL = "https://93.184.215.14/hooks"
# Two scheduled attempts a few milliseconds apart, so failures are final at once.
FAST_RETRY: dict[str, Any] = {"webhook_retry_schedule": "0.01s"}

ApiFactory = Callable[..., Awaitable[ApiClient]]


# ---------------------------------------------------------------- helpers


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is an error of the documented shape, with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["details"], dict)
    return dict(error)


async def get_json(api: ApiClient, path: str, params: Any = None) -> Any:
    response = await api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def endpoint_deliveries(api: ApiClient, endpoint_id: str, **params: Any) -> list[Any]:
    page = await get_json(api, f"{ENDPOINTS}/{endpoint_id}/deliveries", params)
    return list(page["data"])


async def events_of_type(api: ApiClient, event_type: str) -> list[Any]:
    page = await get_json(api, "/api/v1/events", {"type": event_type, "limit": 500})
    return list(page["data"])


async def alerts_of_type(api: ApiClient, alert_type: str) -> list[Any]:
    page = await get_json(api, "/api/v1/alerts", {"type": alert_type, "limit": 500})
    return list(page["data"])


async def audit_for(api: ApiClient, object_id: str) -> list[Any]:
    page = await get_json(api, "/api/v1/audit", {"object_id": object_id, "limit": 500})
    return list(page["data"])


async def stored_endpoint(db: Database, public_id: str) -> WebhookEndpoint | None:
    async with db.transaction(read_only=True) as session:
        return await session.scalar(
            select(WebhookEndpoint).where(WebhookEndpoint.public_id == public_id)
        )


async def endpoint_count(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(WebhookEndpoint)) or 0)


async def settle(db: Database, settings: Settings, **overrides: Any) -> None:
    """Run the delivery loop until no delivery is pending any more.

    `run_until_idle` stops when nothing is *due*; a retry scheduled a few milliseconds
    ahead is not due yet, so run again until every delivery has its final status."""
    # Poll often: an endpoint with nothing due is not asked again for a poll interval.
    overrides.setdefault("webhook_poll_seconds", 0.01)
    loop = delivery_loop(db, settings, **overrides)
    deadline = time.monotonic() + 15
    while True:
        await loop.run_until_idle(within=15)
        async with db.transaction(read_only=True) as session:
            pending = await session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.status == DeliveryStatus.PENDING)
            )
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{pending} deliveries still pending")
        await asyncio.sleep(0.02)


def member_ids(received: list[Received]) -> list[str]:
    return [r.payload["data"]["member"]["id"] for r in received]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def api_with(settings: Settings, db: Database, admin_key: str) -> AsyncIterator[ApiFactory]:
    """Build an admin client of an app running with setting overrides."""
    async with contextlib.AsyncExitStack() as stack:

        async def build(**overrides: Any) -> ApiClient:
            application = create_app(settings.model_copy(update=overrides))
            stack.push_async_callback(application.state.db.dispose)
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=application), base_url="http://testserver"
                )
            )
            return ApiClient(client, admin_key)

        yield build


# ---------------------------------------------------------------- create and read


async def test_create_returns_a_whsec_secret_once_and_stores_it_encrypted(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    response = await api.post(
        ENDPOINTS,
        {
            "url": PUBLIC_URL,
            "event_types": ["points.*", "member.created", "points.*"],
            "description": "CRM",
            "rate_limit": 5,
        },
    )

    assert response.status_code == 201, response.text
    created = response.json()
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert created["id"].startswith("whk_")
    assert created["url"] == PUBLIC_URL
    assert created["event_types"] == ["member.created", "points.*"]
    assert created["description"] == "CRM"
    assert created["rate_limit"] == 5
    assert created["organisation_id"] is None
    assert created["enabled"] is True
    assert created["ordered"] is False
    assert created["failing_since"] is None
    assert created["previous_secret_expires_at"] is None

    other = await create_endpoint(api, PUBLIC_URL)
    assert other["secret"] != secret

    row = await stored_endpoint(db, created["id"])
    assert row is not None
    assert secret not in row.secret
    assert secret.removeprefix("whsec_") not in row.secret
    assert SecretBox(settings.resolved_secret_key).decrypt(row.secret) == secret
    with pytest.raises(SecretUnreadable):
        SecretBox("some other master secret").decrypt(row.secret)


async def test_the_secret_is_never_returned_by_get_list_or_patch(api: ApiClient) -> None:
    created = await create_endpoint(api, PUBLIC_URL, ["member.*"])
    path = f"{ENDPOINTS}/{created['id']}"

    fetched = await api.get(path)
    listed = await api.get(ENDPOINTS)
    patched = await api.patch(path, {"description": "renamed"})

    for response in (fetched, listed, patched):
        assert response.status_code == 200, response.text
        assert created["secret"] not in response.text
        assert "whsec_" not in response.text
    assert "secret" not in fetched.json()
    assert "secret" not in patched.json()
    [item] = listed.json()["data"]
    assert "secret" not in item
    assert item["id"] == created["id"]
    assert fetched.json()["event_types"] == ["member.*"]
    assert patched.json()["description"] == "renamed"


async def test_an_unknown_endpoint_is_a_404_and_a_malformed_id_a_422(api: ApiClient) -> None:
    assert_error(await api.get(f"{ENDPOINTS}/whk_doesnotexist"), 404, "WEBHOOK_ENDPOINT_NOT_FOUND")
    assert_error(
        await api.patch(f"{ENDPOINTS}/whk_doesnotexist", {"description": "x"}),
        404,
        "WEBHOOK_ENDPOINT_NOT_FOUND",
    )
    assert_error(
        await api.delete(f"{ENDPOINTS}/whk_doesnotexist"), 404, "WEBHOOK_ENDPOINT_NOT_FOUND"
    )
    assert_error(await api.get(f"{ENDPOINTS}/not-an-id"), 422, "VALIDATION_ERROR")
    assert_error(await api.get("/api/v1/deliveries/dlv_doesnotexist"), 404, "DELIVERY_NOT_FOUND")
    assert_error(
        await api.post("/api/v1/deliveries/dlv_doesnotexist/retry"), 404, "DELIVERY_NOT_FOUND"
    )


# ---------------------------------------------------------------- validation


async def test_unknown_event_types_are_refused_with_the_unknown_ones_listed(
    api: ApiClient, db: Database
) -> None:
    response = await api.post(
        ENDPOINTS,
        {
            "url": PUBLIC_URL,
            "event_types": ["member.created", "nothing.happened", "ghost.*", "points.earned.*"],
        },
    )

    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert error["details"]["field"] == "event_types"
    assert error["details"]["unknown"] == ["nothing.happened", "ghost.*", "points.earned.*"]
    assert await endpoint_count(db) == 0


# (case, body fields over a valid registration): each alone makes the request invalid.
INVALID_REGISTRATIONS: list[tuple[str, dict[str, Any]]] = [
    ("wildcard in the middle", {"event_types": ["points.*.earned"]}),
    ("leading wildcard", {"event_types": ["*.earned"]}),
    ("wildcard without a dot", {"event_types": ["member*"]}),
    ("double star", {"event_types": ["points.**"]}),
    ("upper case", {"event_types": ["Member.Created"]}),
    ("empty pattern", {"event_types": [""]}),
    ("empty list", {"event_types": []}),
    ("not a list", {"event_types": "member.created"}),
    ("too many", {"event_types": ["member.created"] * 101}),
    ("no event types", {"event_types": None}),
    ("empty url", {"url": ""}),
    ("url with a space", {"url": "https://exa mple.com/"}),
    ("url too long", {"url": "https://example.com/" + "a" * 2048}),
    ("description too long", {"description": "x" * 501}),
    ("description with NUL", {"description": "nul\x00byte"}),
    ("rate limit zero", {"rate_limit": 0}),
    ("rate limit negative", {"rate_limit": -1}),
    ("rate limit too high", {"rate_limit": 10_001}),
    ("ordered not a bool", {"ordered": "sometimes"}),
    ("extra field: secret", {"secret": "whsec_" + "A" * 43 + "="}),
    ("extra field: enabled", {"enabled": False}),
]


async def test_invalid_registrations_are_a_422(api: ApiClient, db: Database) -> None:
    for case, fields in INVALID_REGISTRATIONS:
        response = await api.post(ENDPOINTS, {"url": PUBLIC_URL, "event_types": ["*"], **fields})

        assert response.status_code == 422, f"{case}: {response.text}"
        error = assert_error(response, 422, "VALIDATION_ERROR")
        assert error["details"]["fields"], case
    assert await endpoint_count(db) == 0


async def test_urls_that_are_not_plain_http_or_https_are_refused(
    api: ApiClient, db: Database
) -> None:
    for url, reason in [
        ("ftp://example.com/hook", "scheme not allowed"),
        ("javascript:alert(1)", "scheme not allowed"),
        ("example.com/hook", "scheme not allowed"),
        ("https://user:password@93.184.215.14/hook", "credentials in URL"),
    ]:
        response = await api.post(ENDPOINTS, {"url": url, "event_types": ["*"]})

        assert response.status_code == 422, f"{url}: {response.text}"
        error = assert_error(response, 422, "WEBHOOK_URL_REFUSED")
        assert error["details"]["field"] == "url"
        assert error["details"]["reason"] == reason, url
    assert await endpoint_count(db) == 0


async def test_rate_limit_bounds_are_inclusive(api: ApiClient) -> None:
    for rate_limit in (1, 10_000, None):
        created = await create_endpoint(api, PUBLIC_URL, rate_limit=rate_limit)
        assert created["rate_limit"] == rate_limit


INVALID_PATCHES: list[tuple[str, dict[str, Any]]] = [
    ("null url", {"url": None}),
    ("null event types", {"event_types": None}),
    ("null ordered", {"ordered": None}),
    ("null description", {"description": None}),
    ("null enabled", {"enabled": None}),
    ("empty event types", {"event_types": []}),
    ("bad wildcard", {"event_types": ["points.*.earned"]}),
    ("rate limit zero", {"rate_limit": 0}),
    ("rate limit too high", {"rate_limit": 10_001}),
    ("reason without disabling", {"disabled_reason": "maintenance"}),
    ("reason when enabling", {"disabled_reason": "x", "enabled": True}),
    ("extra field", {"secret": "whsec_x"}),
    ("organisation is not patchable", {"organisation_id": "org_x"}),
]


async def test_invalid_patches_are_a_422_and_change_nothing(api: ApiClient) -> None:
    created = await create_endpoint(api, PUBLIC_URL, ["member.*"], rate_limit=3)
    path = f"{ENDPOINTS}/{created['id']}"
    before = await get_json(api, path)

    for case, body in INVALID_PATCHES:
        response = await api.patch(path, body)

        assert response.status_code == 422, f"{case}: {response.text}"
        assert_error(response, 422, "VALIDATION_ERROR")
    assert await get_json(api, path) == before


async def test_a_patch_with_unknown_event_types_lists_them_and_changes_nothing(
    api: ApiClient,
) -> None:
    created = await create_endpoint(api, PUBLIC_URL, ["member.*"])

    response = await api.patch(
        f"{ENDPOINTS}/{created['id']}", {"event_types": ["points.*", "nope.*"]}
    )

    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert error["details"]["unknown"] == ["nope.*"]
    fetched = await get_json(api, f"{ENDPOINTS}/{created['id']}")
    assert fetched["event_types"] == ["member.*"]


async def test_a_patch_changes_only_the_fields_sent(api: ApiClient) -> None:
    created = await create_endpoint(
        api, PUBLIC_URL, ["member.*"], description="before", rate_limit=3
    )
    path = f"{ENDPOINTS}/{created['id']}"

    patched = await api.patch(path, {"event_types": ["points.*", "member.created"]})
    assert patched.status_code == 200, patched.text
    assert patched.json()["event_types"] == ["member.created", "points.*"]
    assert patched.json()["description"] == "before"
    assert patched.json()["rate_limit"] == 3

    cleared = await api.patch(path, {"rate_limit": None})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["rate_limit"] is None

    disabled = await api.patch(path, {"enabled": False, "disabled_reason": "maintenance"})
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["enabled"] is False
    assert disabled.json()["disabled_reason"] == "maintenance"
    assert disabled.json()["disabled_at"] is not None
    assert (await get_json(api, path))["enabled"] is False


# ---------------------------------------------------------------- SSRF through the API


async def test_urls_reaching_internal_addresses_are_refused(
    api_with: ApiFactory, db: Database
) -> None:
    strict = await api_with(webhook_allowed_networks="")

    for url, reason, shown in [
        ("https://10.0.0.1/", "private", "10.0.0.1"),
        ("https://169.254.169.254/latest", "link-local", "169.254.169.254"),
        ("https://[::1]/", "loopback", "::1"),
        ("https://0.0.0.0/", "unspecified", "0.0.0.0"),
        ("https://localhost/", "loopback", "'localhost'"),  # a name resolving to loopback
    ]:
        response = await strict.post(ENDPOINTS, {"url": url, "event_types": ["*"]})

        assert response.status_code == 422, f"{url}: {response.text}"
        error = assert_error(response, 422, "WEBHOOK_URL_REFUSED")
        assert error["details"]["field"] == "url"
        assert error["details"]["reason"] == reason, url
        assert shown in error["message"]
        assert f"({reason})" in error["message"]
        assert "may not reach" in error["message"]
        assert "MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS" in error["message"]
    assert await endpoint_count(db) == 0
    # The same policy accepts a public address: the refusal is about where the URL leads.
    accepted = await strict.post(ENDPOINTS, {"url": PUBLIC_URL, "event_types": ["*"]})
    assert accepted.status_code == 201, accepted.text


async def test_plain_http_is_refused_unless_allowed(api_with: ApiFactory, db: Database) -> None:
    https_only = await api_with(webhook_allow_http=False)

    for url in ("http://93.184.215.14/hooks", "http://127.0.0.1:8080/hooks"):
        response = await https_only.post(ENDPOINTS, {"url": url, "event_types": ["*"]})
        error = assert_error(response, 422, "WEBHOOK_URL_REFUSED")
        assert error["details"]["reason"] == "scheme not allowed"
        assert "https://" in error["message"]
        assert "MEMBERHUB_WEBHOOK_ALLOW_HTTP" in error["message"]
    assert await endpoint_count(db) == 0

    allowing = await api_with(webhook_allow_http=True)
    created = await allowing.post(
        ENDPOINTS, {"url": "http://93.184.215.14/hooks", "event_types": ["*"]}
    )
    assert created.status_code == 201, created.text


async def test_a_patch_to_a_refused_url_is_refused_and_the_endpoint_unchanged(
    api_with: ApiFactory, db: Database
) -> None:
    strict = await api_with(webhook_allowed_networks="", webhook_allow_http=False)
    created = await create_endpoint(strict, PUBLIC_URL, ["member.*"])
    path = f"{ENDPOINTS}/{created['id']}"
    before = await get_json(strict, path)

    for url in ("https://10.0.0.1/", "https://localhost/", "http://93.184.215.14/hooks"):
        response = await strict.patch(path, {"url": url, "description": "moved"})
        assert_error(response, 422, "WEBHOOK_URL_REFUSED")

    assert await get_json(strict, path) == before
    row = await stored_endpoint(db, created["id"])
    assert row is not None
    assert row.url == PUBLIC_URL
    assert row.description == ""
    assert [e["action"] for e in await audit_for(strict, created["id"])] == [
        "webhook_endpoint.create"
    ]


# ---------------------------------------------------------------- organisations and roles


async def test_a_key_bound_to_an_organisation_manages_its_own_endpoints_only(
    api: ApiClient, db: Database
) -> None:
    ours = await api.create_organisation()
    chapter = await api.create_organisation(parent_id=ours["id"])
    theirs = await api.create_organisation()
    bound = api.with_key(await issue_key(db, Role.INTEGRATION, organisation=ours["id"]))

    own = await create_endpoint(bound, PUBLIC_URL, ["member.*"])
    for_chapter = await create_endpoint(bound, PUBLIC_URL, organisation_id=chapter["id"])
    foreign = await create_endpoint(api, PUBLIC_URL, organisation_id=theirs["id"])
    installation_wide = await create_endpoint(api, PUBLIC_URL)

    assert own["organisation_id"] == ours["id"]
    assert for_chapter["organisation_id"] == chapter["id"]
    refused = await bound.post(
        ENDPOINTS, {"url": PUBLIC_URL, "event_types": ["*"], "organisation_id": theirs["id"]}
    )
    assert_error(refused, 403, "FORBIDDEN")
    assert await endpoint_count(db) == 4

    listed = await get_json(bound, ENDPOINTS)
    assert {e["id"] for e in listed["data"]} == {own["id"], for_chapter["id"]}
    everything = await get_json(api, ENDPOINTS)
    assert len(everything["data"]) == 4

    for hidden in (foreign, installation_wide):
        path = f"{ENDPOINTS}/{hidden['id']}"
        not_found = "WEBHOOK_ENDPOINT_NOT_FOUND"
        assert_error(await bound.get(path), 404, not_found)
        assert_error(await bound.patch(path, {"description": "mine now"}), 404, not_found)
        assert_error(await bound.delete(path), 404, not_found)
        assert_error(await bound.post(f"{path}/rotate-secret"), 404, not_found)
        assert_error(await bound.post(f"{path}/test"), 404, not_found)
        assert_error(await bound.get(f"{path}/deliveries"), 404, not_found)
        recover = {"since": (utcnow() - timedelta(hours=1)).isoformat()}
        assert_error(await bound.post(f"{path}/recover", recover), 404, not_found)
        row = await stored_endpoint(db, hidden["id"])
        assert row is not None
        assert row.description == ""
    assert await endpoint_count(db) == 4


async def test_a_bound_key_sees_no_delivery_of_another_organisation(
    api: ApiClient, db: Database
) -> None:
    ours = await api.create_organisation()
    theirs = await api.create_organisation()
    bound = api.with_key(await issue_key(db, Role.INTEGRATION, organisation=ours["id"]))
    own = await create_endpoint(api, PUBLIC_URL, ["member.created"], organisation_id=ours["id"])
    foreign = await create_endpoint(
        api, PUBLIC_URL, ["member.created"], organisation_id=theirs["id"]
    )
    installation_wide = await create_endpoint(api, PUBLIC_URL, ["member.created"])
    await api.create_member(organisation_id=ours["id"])
    await api.create_member(organisation_id=theirs["id"])
    async with db.transaction() as session:
        assert await fan_out(session, utcnow()) == 2

    [own_delivery] = await endpoint_deliveries(api, own["id"])
    [foreign_delivery] = await endpoint_deliveries(api, foreign["id"])
    assert len(await endpoint_deliveries(api, installation_wide["id"])) == 2

    assert (await bound.get(f"/api/v1/deliveries/{own_delivery['id']}")).status_code == 200
    path = f"/api/v1/deliveries/{foreign_delivery['id']}"
    assert_error(await bound.get(path), 404, "DELIVERY_NOT_FOUND")
    assert_error(await bound.post(f"{path}/retry"), 404, "DELIVERY_NOT_FOUND")
    assert_error(
        await bound.get(f"/api/v1/events/{foreign_delivery['event_id']}/deliveries"),
        404,
        "NOT_FOUND",
    )
    # Of its own event's deliveries, the installation-wide endpoint's is not shown.
    visible = await get_json(bound, f"/api/v1/events/{own_delivery['event_id']}/deliveries")
    assert [d["id"] for d in visible["data"]] == [own_delivery["id"]]
    everything = await get_json(api, f"/api/v1/events/{own_delivery['event_id']}/deliveries")
    assert len(everything["data"]) == 2


async def test_support_agents_cannot_use_webhooks_and_managers_may_only_read(
    api: ApiClient, db: Database
) -> None:
    created = await create_endpoint(api, PUBLIC_URL, ["member.*"])
    path = f"{ENDPOINTS}/{created['id']}"
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    body = {"url": PUBLIC_URL, "event_types": ["*"]}

    error = assert_error(await agent.post(ENDPOINTS, body), 403, "FORBIDDEN")
    assert error["details"]["required_scope"] == "webhooks:write"
    assert_error(await agent.get(ENDPOINTS), 403, "FORBIDDEN")
    assert_error(await agent.get(path), 403, "FORBIDDEN")

    assert [e["id"] for e in (await get_json(manager, ENDPOINTS))["data"]] == [created["id"]]
    assert (await get_json(manager, path))["id"] == created["id"]
    assert (await get_json(manager, f"{path}/deliveries"))["data"] == []
    since = {"since": (utcnow() - timedelta(hours=1)).isoformat()}
    for response in (
        await manager.post(ENDPOINTS, body),
        await manager.patch(path, {"description": "managed"}),
        await manager.delete(path),
        await manager.post(f"{path}/rotate-secret"),
        await manager.post(f"{path}/test"),
        await manager.post(f"{path}/recover", since),
    ):
        error = assert_error(response, 403, "FORBIDDEN")
        assert error["details"]["required_scope"] == "webhooks:write"

    assert await endpoint_count(db) == 1
    assert (await get_json(api, path))["description"] == ""
    assert await events_of_type(api, "webhook.test") == []


# ---------------------------------------------------------------- fan-out


async def test_an_organisation_endpoint_receives_its_own_and_its_chapters_events_only(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    hq = await api.create_organisation()
    chapter = await api.create_organisation(parent_id=hq["id"])
    other = await api.create_organisation()
    scoped = await create_endpoint(
        api, receiver.url("hq"), ["member.created"], organisation_id=hq["id"]
    )
    await create_endpoint(api, receiver.url("all"), ["member.created"])
    receiver.set_secrets("hq", scoped["secret"])

    in_hq = await api.create_member(organisation_id=hq["id"])
    in_chapter = await api.create_member(organisation_id=chapter["id"])
    in_other = await api.create_member(organisation_id=other["id"])
    unaffiliated = await api.create_member()
    await settle(db, settings)

    # Sorted: an unordered endpoint may receive concurrent deliveries in any order.
    assert sorted(member_ids(receiver.received("hq"))) == sorted([in_hq["id"], in_chapter["id"]])
    assert all(r.verified for r in receiver.received("hq"))
    assert sorted(member_ids(receiver.received("all"))) == sorted(
        m["id"] for m in (in_hq, in_chapter, in_other, unaffiliated)
    )


async def test_an_endpoint_receives_only_the_event_types_it_subscribed_to(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    await create_endpoint(api, receiver.url("points"), ["points.*"])
    await create_endpoint(api, receiver.url("created"), ["member.created"])

    member = await api.create_member()
    awarded = await api.post(
        "/api/v1/points/award", {"member_id": member["id"], "points": 50, "reason": "test"}
    )
    assert awarded.status_code == 201, awarded.text
    renamed = await api.patch(f"/api/v1/members/{member['id']}", {"first_name": "Renamed"})
    assert renamed.status_code == 200, renamed.text
    await settle(db, settings)

    assert [r.payload["type"] for r in receiver.received("points")] == ["points.earned"]
    assert [r.payload["type"] for r in receiver.received("created")] == ["member.created"]
    assert [e["type"] for e in await events_of_type(api, "member.updated")] == ["member.updated"]


async def test_an_endpoint_does_not_receive_events_from_before_it_was_created(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    await api.create_member()  # committed, not yet fanned out, when the endpoint appears
    endpoint = await create_endpoint(api, receiver.url("late"), ["member.created"])
    later = await api.create_member()
    await settle(db, settings)

    assert member_ids(receiver.received("late")) == [later["id"]]
    assert len(await endpoint_deliveries(api, endpoint["id"])) == 1


# ---------------------------------------------------------------- test events


async def test_a_test_event_goes_to_its_endpoint_only_signed_with_its_secret(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    target = await create_endpoint(api, receiver.url("target"), ["*"])
    await create_endpoint(api, receiver.url("bystander"), ["*"])
    receiver.set_secrets("target", target["secret"])

    response = await api.post(f"{ENDPOINTS}/{target['id']}/test", {"message": "hello there"})

    assert response.status_code == 202, response.text
    event_id = response.json()["event_id"]
    assert event_id.startswith("evt_")
    await settle(db, settings)
    [received] = receiver.received("target")
    assert received.verified
    assert received.webhook_id == event_id
    assert received.payload["type"] == "webhook.test"
    assert received.payload["data"] == {"endpoint_id": target["id"], "message": "hello there"}
    assert receiver.received("bystander") == []
    [delivery] = (await get_json(api, f"/api/v1/events/{event_id}/deliveries"))["data"]
    assert delivery["endpoint_id"] == target["id"]
    assert delivery["status"] == "succeeded"


async def test_a_test_event_without_a_body_carries_the_default_message(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    target = await create_endpoint(api, receiver.url("target"), ["*"])

    response = await api.post(f"{ENDPOINTS}/{target['id']}/test")

    assert response.status_code == 202, response.text
    await settle(db, settings)
    [received] = receiver.received("target")
    assert received.payload["data"]["message"] == "A test event from memberhub."


async def test_a_test_event_reaches_an_endpoint_whatever_types_it_subscribed_to(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    target = await create_endpoint(api, receiver.url("members-only"), ["member.*"])

    response = await api.post(f"{ENDPOINTS}/{target['id']}/test")

    assert response.status_code == 202, response.text
    await settle(db, settings)
    assert [r.payload["type"] for r in receiver.received("members-only")] == ["webhook.test"]


async def test_a_test_event_message_is_validated(api: ApiClient) -> None:
    target = await create_endpoint(api, PUBLIC_URL, ["*"])
    path = f"{ENDPOINTS}/{target['id']}/test"

    for body in ({"message": "x" * 201}, {"message": "nul\x00"}, {"bogus": 1}):
        assert_error(await api.post(path, body), 422, "VALIDATION_ERROR")
    assert await events_of_type(api, "webhook.test") == []


async def test_a_disabled_endpoint_cannot_be_sent_a_test_event(api: ApiClient) -> None:
    target = await create_endpoint(api, PUBLIC_URL, ["*"])
    disabled = await api.patch(f"{ENDPOINTS}/{target['id']}", {"enabled": False})
    assert disabled.status_code == 200, disabled.text

    response = await api.post(f"{ENDPOINTS}/{target['id']}/test")

    assert_error(response, 409, "WEBHOOK_ENDPOINT_DISABLED")
    assert await events_of_type(api, "webhook.test") == []


# ---------------------------------------------------------------- secret rotation


async def test_rotation_signs_with_both_secrets_until_the_old_one_expires(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("rotating"), ["member.created"])
    path = f"{ENDPOINTS}/{endpoint['id']}"
    old = endpoint["secret"]

    response = await api.post(f"{path}/rotate-secret")

    assert response.status_code == 200, response.text
    rotated = response.json()
    new = rotated["secret"]
    assert new.startswith("whsec_")
    assert len(base64.b64decode(new.removeprefix("whsec_"), validate=True)) == 32
    assert new != old
    assert old not in response.text
    in_a_day = utcnow() + timedelta(hours=24)
    expires = parse_time((await get_json(api, path))["previous_secret_expires_at"])
    assert abs((expires - in_a_day).total_seconds()) < 60
    assert parse_time(rotated["previous_secret_expires_at"]) == expires
    row = await stored_endpoint(db, endpoint["id"])
    assert row is not None
    assert row.previous_secret is not None
    box = SecretBox(settings.resolved_secret_key)
    assert (box.decrypt(row.secret), box.decrypt(row.previous_secret)) == (new, old)

    receiver.set_secrets("rotating", old, new)
    await api.create_member()
    await settle(db, settings)

    [during] = receiver.received("rotating")
    signatures = during.signature.split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    assert during.verified_with == (0, 1)  # each secret alone verifies it

    # The overlap is over: only the new secret signs.
    async with db.transaction() as session:
        await session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.public_id == endpoint["id"])
            .values(previous_secret_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert (await get_json(api, path))["previous_secret_expires_at"] is None
    await api.create_member()
    await settle(db, settings)

    after = receiver.received("rotating")[-1]
    assert len(after.signature.split(" ")) == 1
    assert after.verified_with == (1,)


# ---------------------------------------------------------------- the delivery log


async def test_deliveries_are_listed_newest_first_filtered_and_paginated(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("log"), ["member.created"])
    other = await create_endpoint(api, receiver.url("other"), ["member.*"])

    def bounce_some(request: Received, _previous: int) -> Reply:
        email = request.payload["data"]["member"]["email"]
        return Reply(status=500, body="no") if email.startswith("bounce") else Reply()

    receiver.set_handler("log", bounce_some)
    first = await api.create_member(email="first@example.com")
    bounced = await api.create_member(email="bounce@example.com")
    last = await api.create_member(email="last@example.com")
    await settle(db, settings, **FAST_RETRY)
    event_of = {r.payload["data"]["member"]["id"]: r.webhook_id for r in receiver.received("log")}

    everything = await endpoint_deliveries(api, endpoint["id"])
    assert [d["event_id"] for d in everything] == [
        event_of[last["id"]],
        event_of[bounced["id"]],
        event_of[first["id"]],
    ]
    assert {d["endpoint_id"] for d in everything} == {endpoint["id"]}
    assert {d["event_type"] for d in everything} == {"member.created"}

    [failed] = await endpoint_deliveries(api, endpoint["id"], status="failed")
    assert failed["event_id"] == event_of[bounced["id"]]
    assert failed["attempt_count"] == 2
    assert failed["last_status_code"] == 500
    assert failed["last_error"] == "HTTP 500"
    assert failed["next_attempt_at"] is None
    assert failed["completed_at"] is not None
    assert [(a["number"], a["status_code"], a["succeeded"]) for a in failed["attempts"]] == [
        (1, 500, False),
        (2, 500, False),
    ]
    assert all(a["response_body"] == "no" and a["error"] == "HTTP 500" for a in failed["attempts"])
    succeeded = await endpoint_deliveries(api, endpoint["id"], status="succeeded")
    assert [d["event_id"] for d in succeeded] == [event_of[last["id"]], event_of[first["id"]]]
    assert await endpoint_deliveries(api, endpoint["id"], status="pending") == []
    assert_error(
        await api.get(f"{ENDPOINTS}/{endpoint['id']}/deliveries", params={"status": "lost"}),
        422,
        "VALIDATION_ERROR",
    )

    page_one = await get_json(api, f"{ENDPOINTS}/{endpoint['id']}/deliveries", {"limit": 2})
    assert page_one["pagination"]["has_more"] is True
    page_two = await get_json(
        api,
        f"{ENDPOINTS}/{endpoint['id']}/deliveries",
        {"limit": 2, "cursor": page_one["pagination"]["next_cursor"]},
    )
    assert page_two["pagination"]["has_more"] is False
    assert [d["id"] for d in page_one["data"] + page_two["data"]] == [d["id"] for d in everything]

    one = await get_json(api, f"/api/v1/deliveries/{failed['id']}")
    assert one == failed
    by_event = await get_json(api, f"/api/v1/events/{event_of[bounced['id']]}/deliveries")
    assert {d["endpoint_id"] for d in by_event["data"]} == {endpoint["id"], other["id"]}
    assert len(await endpoint_deliveries(api, other["id"])) == 3


async def test_an_attempt_records_the_first_2048_characters_of_the_response_and_its_timing(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("chatty"), ["member.created"])
    body = "".join(f"{i:05d}" for i in range(1000))  # 5000 characters, no prefix repeats
    receiver.set_handler("chatty", always(Reply(status=200, body=body)))
    before = utcnow()

    await api.create_member()
    await settle(db, settings)

    [delivery] = await endpoint_deliveries(api, endpoint["id"])
    assert delivery["status"] == "succeeded"
    assert delivery["last_status_code"] == 200
    assert delivery["last_error"] is None
    [attempt] = delivery["attempts"]
    assert attempt["number"] == 1
    assert attempt["succeeded"] is True
    assert attempt["status_code"] == 200
    assert attempt["error"] is None
    assert attempt["response_body"] == body[:2048]
    assert isinstance(attempt["duration_ms"], int)
    assert 0 <= attempt["duration_ms"] < 10_000
    assert before <= parse_time(attempt["started_at"]) <= utcnow()


async def test_an_unreachable_receiver_is_recorded_as_an_attempt_without_status(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    endpoint = await create_endpoint(
        api, f"http://127.0.0.1:{closed_port()}/hooks", ["member.created"]
    )

    await api.create_member()
    await settle(db, settings, **FAST_RETRY)

    [delivery] = await endpoint_deliveries(api, endpoint["id"])
    assert delivery["status"] == "failed"
    assert delivery["last_status_code"] is None
    assert [a["status_code"] for a in delivery["attempts"]] == [None, None]
    assert all(a["error"].startswith("ConnectError") for a in delivery["attempts"])
    assert all(a["response_body"] is None for a in delivery["attempts"])


# ---------------------------------------------------------------- retry and recover


async def test_a_failed_delivery_can_be_retried_and_then_succeeds(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("flaky"), ["member.created"])
    receiver.set_handler("flaky", always(Reply(status=500, body="down")))
    await api.create_member()
    await settle(db, settings, **FAST_RETRY)
    [failed] = await endpoint_deliveries(api, endpoint["id"])
    assert (failed["status"], failed["attempt_count"]) == ("failed", 2)
    receiver.set_handler("flaky", None)

    response = await api.post(f"/api/v1/deliveries/{failed['id']}/retry")

    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["id"] == failed["id"]
    assert queued["status"] == "pending"
    assert queued["completed_at"] is None
    assert queued["next_attempt_at"] is not None
    await settle(db, settings, **FAST_RETRY)
    delivered = await get_json(api, f"/api/v1/deliveries/{failed['id']}")
    assert delivered["status"] == "succeeded"
    assert [a["status_code"] for a in delivered["attempts"]] == [500, 500, 200]
    assert receiver.ids("flaky") == [failed["event_id"]] * 3
    assert receiver.successful_ids("flaky") == [failed["event_id"]]
    health = await get_json(api, f"{ENDPOINTS}/{endpoint['id']}")
    assert health["failing_since"] is None
    assert health["last_success_at"] is not None
    assert "webhook_delivery.retry" in [e["action"] for e in await audit_for(api, failed["id"])]


async def test_a_manual_retry_is_a_single_attempt_not_a_new_schedule(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("broken"), ["member.created"])
    receiver.set_handler("broken", always(Reply(status=500, body="down")))
    await api.create_member()
    await settle(db, settings, **FAST_RETRY)
    [failed] = await endpoint_deliveries(api, endpoint["id"])

    response = await api.post(f"/api/v1/deliveries/{failed['id']}/retry")

    assert response.status_code == 202, response.text
    await settle(db, settings, **FAST_RETRY)
    again = await get_json(api, f"/api/v1/deliveries/{failed['id']}")
    assert again["status"] == "failed"
    assert again["attempt_count"] == 3
    assert [a["number"] for a in again["attempts"]] == [1, 2, 3]
    assert len(receiver.received("broken")) == 3


async def test_a_delivery_of_a_disabled_endpoint_cannot_be_retried(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("off"), ["member.created"])
    receiver.set_handler("off", always(Reply(status=500)))
    await api.create_member()
    await settle(db, settings, **FAST_RETRY)
    [failed] = await endpoint_deliveries(api, endpoint["id"])
    assert (await api.patch(f"{ENDPOINTS}/{endpoint['id']}", {"enabled": False})).is_success

    response = await api.post(f"/api/v1/deliveries/{failed['id']}/retry")

    assert_error(response, 409, "WEBHOOK_ENDPOINT_DISABLED")
    assert await get_json(api, f"/api/v1/deliveries/{failed['id']}") == failed


async def test_recover_requeues_exactly_the_failed_deliveries_of_the_window(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("outage"), ["member.created"])
    path = f"{ENDPOINTS}/{endpoint['id']}"
    receiver.set_handler("outage", always(Reply(status=503, body="outage")))
    before = await api.create_member()
    await settle(db, settings, **FAST_RETRY)
    since = utcnow()
    inside = [await api.create_member(), await api.create_member()]
    await settle(db, settings, **FAST_RETRY)
    until = utcnow()
    after = await api.create_member()
    await settle(db, settings, **FAST_RETRY)
    event_of = {
        r.payload["data"]["member"]["id"]: r.webhook_id for r in receiver.received("outage")
    }
    assert len(await endpoint_deliveries(api, endpoint["id"], status="failed")) == 4
    receiver.set_handler("outage", None)

    response = await api.post(
        f"{path}/recover", {"since": since.isoformat(), "until": until.isoformat()}
    )

    assert response.status_code == 200, response.text
    assert response.json() == {"requeued": 2}
    await settle(db, settings, **FAST_RETRY)
    succeeded = await endpoint_deliveries(api, endpoint["id"], status="succeeded")
    assert {d["event_id"] for d in succeeded} == {event_of[m["id"]] for m in inside}
    failed = await endpoint_deliveries(api, endpoint["id"], status="failed")
    assert {d["event_id"] for d in failed} == {event_of[before["id"]], event_of[after["id"]]}
    assert sorted(receiver.successful_ids("outage")) == sorted(event_of[m["id"]] for m in inside)
    again = await api.post(
        f"{path}/recover", {"since": since.isoformat(), "until": until.isoformat()}
    )
    assert again.json() == {"requeued": 0}
    audited = [
        e for e in await audit_for(api, endpoint["id"]) if e["action"] == "webhook_endpoint.recover"
    ]
    assert len(audited) == 2


async def test_recover_refuses_an_empty_or_inverted_window(api: ApiClient) -> None:
    endpoint = await create_endpoint(api, PUBLIC_URL, ["member.created"])
    path = f"{ENDPOINTS}/{endpoint['id']}/recover"
    now = utcnow()

    for body in (
        {"since": now.isoformat(), "until": now.isoformat()},
        {"since": now.isoformat(), "until": (now - timedelta(minutes=1)).isoformat()},
        {},
        {"since": "yesterday"},
        {"since": now.isoformat(), "extra": 1},
    ):
        assert_error(await api.post(path, body), 422, "VALIDATION_ERROR")


async def test_recover_on_a_disabled_endpoint_is_a_conflict(api: ApiClient) -> None:
    endpoint = await create_endpoint(api, PUBLIC_URL, ["member.created"])
    path = f"{ENDPOINTS}/{endpoint['id']}"
    assert (await api.patch(path, {"enabled": False})).is_success

    response = await api.post(f"{path}/recover", {"since": utcnow().isoformat()})

    assert_error(response, 409, "WEBHOOK_ENDPOINT_DISABLED")


# ---------------------------------------------------------------- disabling


async def test_a_410_disables_the_endpoint_fails_its_queue_and_raises_an_alert(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("gone"), ["member.created"])
    path = f"{ENDPOINTS}/{endpoint['id']}"
    receiver.set_handler("gone", always(Reply(status=410, body="gone")))
    for _ in range(3):
        await api.create_member()

    # One delivery at a time: the first answer decides for the other two.
    await settle(db, settings, webhook_endpoint_concurrency=1)

    assert len(receiver.received("gone")) == 1
    disabled = await get_json(api, path)
    assert disabled["enabled"] is False
    assert "410" in disabled["disabled_reason"]
    assert disabled["disabled_at"] is not None
    assert disabled["failing_since"] is not None
    deliveries = await endpoint_deliveries(api, endpoint["id"])
    assert [d["status"] for d in deliveries] == ["failed"] * 3
    answered, *cut_short = sorted(deliveries, key=lambda d: -d["attempt_count"])
    assert answered["last_status_code"] == 410
    assert [a["status_code"] for a in answered["attempts"]] == [410]
    for delivery in cut_short:
        assert delivery["attempts"] == []
        assert delivery["last_error"].startswith("The endpoint was disabled")
    [event] = await events_of_type(api, "webhook.endpoint.disabled")
    assert event["data"]["endpoint_id"] == endpoint["id"]
    # The event reaches every endpoint subscribed to it: the URL's path (a token, often)
    # is not in it.
    assert receiver.url("gone").startswith(event["data"]["url"].removesuffix("…"))
    assert event["data"]["url"].endswith("/…")
    assert "/gone" not in str(event)
    assert "410" in event["data"]["reason"]
    [alert] = await alerts_of_type(api, "WEBHOOK_ENDPOINT_DISABLED")
    assert alert["data"]["endpoint_id"] == endpoint["id"]
    assert endpoint["id"] in alert["message"]
    # Read by support agents, who may not read endpoints: the host, not the URL's path.
    assert "url" not in alert["data"]
    assert receiver.url("gone").startswith(alert["data"]["host"] + "/")
    assert "/gone" not in str(alert)

    # While disabled it is sent nothing.
    await api.create_member()
    await settle(db, settings)
    assert len(receiver.received("gone")) == 1
    assert len(await endpoint_deliveries(api, endpoint["id"])) == 3

    response = await api.patch(path, {"enabled": True})

    assert response.status_code == 200, response.text
    enabled = response.json()
    assert enabled["enabled"] is True
    assert enabled["disabled_reason"] is None
    assert enabled["disabled_at"] is None
    assert enabled["failing_since"] is None
    receiver.set_handler("gone", None)
    later = await api.create_member()
    await settle(db, settings)
    assert member_ids(receiver.received("gone"))[-1] == later["id"]
    assert receiver.received("gone")[-1].status == 200


async def test_an_endpoint_failing_longer_than_the_limit_is_disabled(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("down"), ["member.created"])
    path = f"{ENDPOINTS}/{endpoint['id']}"
    receiver.set_handler("down", always(Reply(status=500, body="down")))
    # The limit is judged against the clock: a generous one first, so a slow machine
    # cannot cross it, then one the endpoint has certainly been failing for longer than.
    await api.create_member()
    await settle(db, settings, **FAST_RETRY, webhook_disable_after_seconds=3600)

    failing = await get_json(api, path)
    assert failing["enabled"] is True  # failing for less than the limit
    assert failing["failing_since"] is not None
    assert await events_of_type(api, "webhook.endpoint.disabled") == []

    await api.create_member()
    await settle(db, settings, **FAST_RETRY, webhook_disable_after_seconds=0.001)

    disabled = await get_json(api, path)
    assert disabled["enabled"] is False
    assert disabled["disabled_reason"].startswith("No successful delivery since")
    assert disabled["failing_since"] == failing["failing_since"]
    [event] = await events_of_type(api, "webhook.endpoint.disabled")
    assert event["data"]["endpoint_id"] == endpoint["id"]
    assert event["data"]["reason"] == disabled["disabled_reason"]
    [alert] = await alerts_of_type(api, "WEBHOOK_ENDPOINT_DISABLED")
    assert alert["data"]["endpoint_id"] == endpoint["id"]


@pytest.mark.parametrize(("last_failed_days_ago", "disabled"), [(7, False), (0.001, True)])
async def test_failing_for_the_limit_means_attempts_failing_all_that_time(
    api: ApiClient,
    db: Database,
    settings: Settings,
    receiver: WebhookReceiver,
    last_failed_days_ago: float,
    disabled: bool,
) -> None:
    """An endpoint that failed once eight days ago, then had nothing to receive for a week,
    is not disabled by its next failure; one that kept failing all along is."""
    endpoint = await create_endpoint(api, receiver.url("flaky"), ["member.created"])
    receiver.set_handler("flaky", always(Reply(status=500, body="down")))
    async with db.transaction() as session:
        await session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.public_id == endpoint["id"])
            .values(
                failing_since=utcnow() - timedelta(days=8),
                last_failure_at=utcnow() - timedelta(days=last_failed_days_ago),
            )
        )
    await api.create_member()
    # The retries (10 ms apart) and the five days of the default limit.
    await settle(db, settings, webhook_retry_schedule="0.01s")

    after = await get_json(api, f"{ENDPOINTS}/{endpoint['id']}")
    assert after["enabled"] is (not disabled), after
    if not disabled:
        # Failing again, from this failure on.
        assert datetime.fromisoformat(after["failing_since"]) > utcnow() - timedelta(minutes=5)


@pytest.mark.parametrize("status", [302, 307])
async def test_a_redirect_is_a_failure_and_is_not_followed(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver, status: int
) -> None:
    endpoint = await create_endpoint(api, receiver.url("moved"), ["member.created"])
    receiver.set_handler(
        "moved", always(Reply(status=status, body="", headers={"location": receiver.url("new")}))
    )

    await api.create_member()
    await settle(db, settings, **FAST_RETRY)

    assert len(receiver.received("moved")) == 2
    assert receiver.received("new") == []
    [delivery] = await endpoint_deliveries(api, endpoint["id"])
    assert delivery["status"] == "failed"
    assert [a["status_code"] for a in delivery["attempts"]] == [status, status]
    assert delivery["last_error"] == f"HTTP {status} (redirects are not followed)"
    assert (await get_json(api, f"{ENDPOINTS}/{endpoint['id']}"))["last_success_at"] is None


async def test_an_event_larger_than_the_payload_limit_fails_at_once_and_is_not_sent(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("small"), ["member.created"])

    await api.create_member(first_name="A" * 100)
    await settle(db, settings, webhook_max_payload_bytes=200)

    assert receiver.received("small") == []
    [delivery] = await endpoint_deliveries(api, endpoint["id"])
    assert delivery["status"] == "failed"
    assert delivery["attempt_count"] == 1
    [attempt] = delivery["attempts"]
    assert attempt["status_code"] is None
    assert attempt["succeeded"] is False
    assert "exceeds the limit of 200 bytes" in attempt["error"]
    assert attempt["error"].startswith("payload of ")
    assert delivery["last_error"] == attempt["error"]


async def test_an_oversized_payload_says_nothing_about_the_receivers_health(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("small"), ["member.created"])

    await api.create_member(first_name="A" * 100)
    await settle(db, settings, webhook_max_payload_bytes=200, webhook_disable_after_seconds=0.0)

    health = await get_json(api, f"{ENDPOINTS}/{endpoint['id']}")
    assert health["enabled"] is True
    assert health["failing_since"] is None


# ---------------------------------------------------------------- delete, audit, metrics


async def test_deleting_an_endpoint_removes_it_with_its_deliveries(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver
) -> None:
    endpoint = await create_endpoint(api, receiver.url("bye"), ["member.created"])
    kept = await create_endpoint(api, receiver.url("kept"), ["member.created"])
    await api.create_member()
    await settle(db, settings)
    [delivery] = await endpoint_deliveries(api, endpoint["id"])
    path = f"{ENDPOINTS}/{endpoint['id']}"

    response = await api.delete(path)

    assert response.status_code == 204
    assert response.content == b""
    assert_error(await api.get(path), 404, "WEBHOOK_ENDPOINT_NOT_FOUND")
    assert_error(await api.delete(path), 404, "WEBHOOK_ENDPOINT_NOT_FOUND")
    assert [e["id"] for e in (await get_json(api, ENDPOINTS))["data"]] == [kept["id"]]
    assert_error(await api.get(f"/api/v1/deliveries/{delivery['id']}"), 404, "DELIVERY_NOT_FOUND")
    async with db.transaction(read_only=True) as session:
        deliveries = await session.scalar(select(func.count()).select_from(WebhookDelivery))
        attempts = await session.scalar(select(func.count()).select_from(WebhookAttempt))
    assert (deliveries, attempts) == (1, 1)  # the other endpoint's
    assert len(await endpoint_deliveries(api, kept["id"])) == 1


async def test_endpoint_writes_are_audited_and_no_secret_is(api: ApiClient, db: Database) -> None:
    endpoint = await create_endpoint(api, PUBLIC_URL, ["member.*"])
    path = f"{ENDPOINTS}/{endpoint['id']}"
    patched = await api.patch(path, {"description": "CRM"})
    assert patched.status_code == 200, patched.text
    rotated = await api.post(f"{path}/rotate-secret")
    assert rotated.status_code == 200, rotated.text
    assert (await api.delete(path)).status_code == 204

    entries = await audit_for(api, endpoint["id"])

    assert sorted(e["action"] for e in entries) == sorted(
        [
            "webhook_endpoint.create",
            "webhook_endpoint.update",
            "webhook_endpoint.rotate_secret",
            "webhook_endpoint.delete",
        ]
    )
    assert all(e["object_type"] == "webhook_endpoint" for e in entries)
    assert all(e["actor"].startswith("key_") for e in entries)
    [update_entry] = [e for e in entries if e["action"] == "webhook_endpoint.update"]
    assert update_entry["changes"] == {"description": {"before": "", "after": "CRM"}}
    [create_entry] = [e for e in entries if e["action"] == "webhook_endpoint.create"]
    assert PUBLIC_URL in json.dumps(create_entry["changes"])
    text = json.dumps(entries)
    assert endpoint["secret"] not in text
    assert rotated.json()["secret"] not in text
    assert "whsec_" not in text


async def test_metrics_show_the_queue_depth_and_oldest_pending_age_per_endpoint(
    api: ApiClient, db: Database, http: httpx.AsyncClient
) -> None:
    busy = await create_endpoint(api, PUBLIC_URL, ["member.created"])
    idle = await create_endpoint(api, PUBLIC_URL, ["points.*"])
    for _ in range(3):
        await api.create_member()
    async with db.transaction() as session:
        assert await fan_out(session, utcnow()) == 3
        # As if the oldest had waited a minute.
        await session.execute(
            update(WebhookDelivery).values(created_at=utcnow() - timedelta(seconds=60))
        )

    samples = await webhook_samples(http)

    assert samples[("memberhub_webhook_queue_depth", busy["id"])] == 3
    age = samples[("memberhub_webhook_oldest_pending_age_seconds", busy["id"])]
    assert 60 <= age < 120
    assert ("memberhub_webhook_queue_depth", idle["id"]) not in samples
    assert samples[("memberhub_webhook_queue_depth_overall", None)] == 3

    async with db.transaction() as session:
        await session.execute(
            update(WebhookDelivery).values(status=DeliveryStatus.SUCCEEDED, next_attempt_at=None)
        )
    drained = await webhook_samples(http)
    assert ("memberhub_webhook_queue_depth", busy["id"]) not in drained
    assert ("memberhub_webhook_oldest_pending_age_seconds", busy["id"]) not in drained
    assert drained[("memberhub_webhook_queue_depth_overall", None)] == 0


async def webhook_samples(http: httpx.AsyncClient) -> dict[tuple[str, str | None], float]:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (sample.name, sample.labels.get("endpoint")): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name.startswith("memberhub_webhook_")
    }
