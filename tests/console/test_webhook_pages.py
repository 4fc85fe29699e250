"""The webhook pages: an endpoint registered in the console is the API's endpoint (its secret
shown once, on the answering page only), the URL policy refuses private addresses with the
API's message, the deliveries and attempts shown are the API's, and retry, recover,
enable/disable, secret rotation and test events act as the API's do; roles, organisations,
CSRF and bad input are refused and change nothing."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from memberhub.auth.roles import Role
from memberhub.console.session import COOKIE_NAME, load_session
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint
from tests.conftest import issue_key
from tests.console.support import create_staff_user, csrf_of, sign_in, submit
from tests.fakes.webhook_receiver import Reply, WebhookReceiver, always, running_receiver
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, delivery_loop, emit_alerts

PAGE = "/console/webhooks"
ENDPOINTS = "/api/v1/webhook-endpoints"
SECRET = re.compile(r'id="signing-secret">([^<]+)<')
# Two scheduled attempts a few milliseconds apart, so failures are final at once.
FAST_RETRY: dict[str, Any] = {"webhook_retry_schedule": "0.01s"}


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with running_receiver() as running:
        yield running


async def settle(db: Database, settings: Settings) -> None:
    """Run the worker's delivery loop until no delivery is pending."""
    loop = delivery_loop(db, settings, webhook_poll_seconds=0.01, **FAST_RETRY)
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
        assert time.monotonic() < deadline, f"{pending} deliveries still pending"
        # A retry a few milliseconds ahead is not due yet.
        await asyncio.sleep(0.02)


async def endpoint_count(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(WebhookEndpoint)) or 0)


async def api_deliveries(api: ApiClient, endpoint_id: str, **params: Any) -> list[dict[str, Any]]:
    response = await api.get(f"{ENDPOINTS}/{endpoint_id}/deliveries", params)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def shown_deliveries(page: httpx.Response) -> list[tuple[str, str, list[str]]]:
    """Each delivery on the page: its id, status and its attempts' status codes."""
    shown = []
    for block in page.text.split('<article class="delivery"')[1:]:
        delivery_id = re.search(r'id="(dlv_[0-9a-z]+)"', block)
        status = re.search(r'class="delivery-status">([^<]*)<', block)
        assert delivery_id is not None, block
        assert status is not None, block
        codes = re.findall(r'class="status-code">([^<]*)<', block)
        shown.append((delivery_id.group(1), status.group(1), codes))
    return shown


def from_api(deliveries: list[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    return [
        (
            d["id"],
            d["status"],
            ["—" if a["status_code"] is None else str(a["status_code"]) for a in d["attempts"]],
        )
        for d in deliveries
    ]


async def failed_delivery(
    api: ApiClient, db: Database, settings: Settings, receiver: WebhookReceiver, name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An endpoint whose receiver answers 500, and its one failed delivery (2 attempts)."""
    endpoint = await create_endpoint(api, receiver.url(name), ["member.created"])
    receiver.set_handler(name, always(Reply(status=500, body="down")))
    await api.create_member()
    await settle(db, settings)
    [failed] = await api_deliveries(api, endpoint["id"])
    assert (failed["status"], failed["attempt_count"]) == ("failed", 2)
    return endpoint, failed


async def register(browser: httpx.AsyncClient, **fields: str) -> httpx.Response:
    return await submit(browser, PAGE, PAGE, fields)


# ---------------------------------------------------------------- registration


async def test_an_endpoint_registered_in_the_console_is_the_apis_and_its_secret_shown_once(
    browser: httpx.AsyncClient,
    api: ApiClient,
    db: Database,
    settings: Settings,
    receiver: WebhookReceiver,
    app: Any,
) -> None:
    await create_staff_user(db)
    await sign_in(browser)

    created = await register(
        browser,
        url=receiver.url("crm"),
        event_types="member.created, points.*",
        description="CRM updates",
        rate_limit="",
    )

    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    match = SECRET.search(created.text)
    assert match is not None
    secret = match.group(1)
    assert secret.startswith("whsec_")
    [endpoint] = (await api.get(ENDPOINTS)).json()["data"]
    assert endpoint["url"] == receiver.url("crm")
    assert endpoint["event_types"] == ["member.created", "points.*"]
    assert endpoint["description"] == "CRM updates"
    assert endpoint["enabled"] is True
    assert "secret" not in endpoint
    # Shown on the answering page only: not in the session cookie, not on any later page.
    cookie = browser.cookies.get(COOKIE_NAME)
    assert secret not in load_session(app.state.settings, cookie, time.time()).data.values()
    for path in (PAGE, f"{PAGE}/{endpoint['id']}"):
        later = await browser.get(path)
        assert later.status_code == 200
        assert secret not in later.text
        assert endpoint["id"] in later.text
    # It is the secret deliveries are signed with: a test event sent from the console
    # verifies with it.
    receiver.set_secrets("crm", secret)
    sent = await submit(
        browser, f"{PAGE}/{endpoint['id']}", f"{PAGE}/{endpoint['id']}/test", {"message": "hi"}
    )
    assert sent.status_code == 303
    await settle(db, settings)
    [received] = receiver.received("crm")
    assert received.verified
    assert received.payload["type"] == "webhook.test"
    assert received.payload["data"]["message"] == "hi"
    audit = (await api.get("/api/v1/audit", {"object_id": endpoint["id"]})).json()["data"]
    assert all(secret not in str(entry) for entry in audit)


async def test_a_url_reaching_a_private_network_is_refused_with_the_apis_message(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    from_the_api = await api.post(ENDPOINTS, {"url": "https://10.0.0.1/", "event_types": ["*"]})
    assert from_the_api.status_code == 422

    typed = {"description": "CRM <sync>", "rate_limit": "7", "ordered": "true"}
    refused = await register(browser, url="https://10.0.0.1/", event_types="member.*", **typed)

    assert refused.status_code == 422, refused.text
    message = from_the_api.json()["error"]["message"]
    assert "may not reach" in message
    assert message.replace("'", "&#39;") in refused.text
    assert await endpoint_count(db) == 0
    # The form comes back as it was typed, to correct rather than retype.
    for shown in (
        'name="url" type="url"',
        'value="https://10.0.0.1/"',
        'value="member.*"',
        'value="CRM &lt;sync&gt;"',
        'value="7"',
        'value="true" checked',
    ):
        assert shown in refused.text, shown


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        (
            {"url": "https://93.184.215.14/h", "event_types": "no.such.event, member.*"},
            "match no event of the catalog: no.such.event (",
        ),
        (
            {"url": "https://93.184.215.14/h", "event_types": " , "},
            "event_types: List should have at least 1",
        ),
        ({"url": "ftp://93.184.215.14/h", "event_types": "*"}, "must use http:// or https://"),
        (
            {"url": "https://93.184.215.14/h", "event_types": "*", "rate_limit": "0"},
            "rate_limit: Input",
        ),
        (
            {"url": "https://93.184.215.14/h", "event_types": "*", "rate_limit": "x"},
            "rate_limit: Input",
        ),
        (
            {"url": "https://93.184.215.14/h", "event_types": "*", "organisation_id": "org_nope"},
            "does not exist",
        ),
        ({"url": "has space", "event_types": "*"}, "url: contains characters that are not"),
        (
            {"url": "https://93.184.215.14/h", "event_types": "*", "description": "a\x00b"},
            "description: contains",
        ),
        ({"event_types": "*"}, "url: Field required"),
    ],
)
async def test_invalid_registrations_are_refused_clearly_and_create_nothing(
    browser: httpx.AsyncClient, db: Database, fields: dict[str, str], shown: str
) -> None:
    await create_staff_user(db)
    await sign_in(browser)

    refused = await register(browser, **fields)

    assert 400 <= refused.status_code < 500, refused.text
    assert '<p class="error" role="alert">' in refused.text
    assert shown in refused.text
    assert await endpoint_count(db) == 0


# ---------------------------------------------------------------- deliveries


async def test_the_deliveries_and_attempts_shown_are_the_apis_and_retry_adds_an_attempt(
    browser: httpx.AsyncClient,
    api: ApiClient,
    db: Database,
    settings: Settings,
    receiver: WebhookReceiver,
) -> None:
    staff_id = await create_staff_user(db)
    await sign_in(browser)
    endpoint, failed = await failed_delivery(api, db, settings, receiver, "flaky")
    page_path = f"{PAGE}/{endpoint['id']}"

    page = await browser.get(page_path)
    assert shown_deliveries(page) == from_api(await api_deliveries(api, endpoint["id"]))
    assert shown_deliveries(page) == [(failed["id"], "failed", ["500", "500"])]
    assert "failing since" in page.text

    receiver.set_handler("flaky", None)
    retried = await submit(browser, page_path, f"{PAGE}/deliveries/{failed['id']}/retry", {})

    assert retried.status_code == 303
    assert retried.headers["location"] == page_path
    queued = (await api.get(f"/api/v1/deliveries/{failed['id']}")).json()
    assert (queued["status"], queued["completed_at"]) == ("pending", None)
    await settle(db, settings)
    delivered = (await api.get(f"/api/v1/deliveries/{failed['id']}")).json()
    assert delivered["status"] == "succeeded"
    assert [a["status_code"] for a in delivered["attempts"]] == [500, 500, 200]
    after = await browser.get(page_path)
    assert "queued for one more attempt" in after.text
    assert shown_deliveries(after) == from_api(await api_deliveries(api, endpoint["id"]))
    audit = (await api.get("/api/v1/audit", {"object_id": failed["id"]})).json()["data"]
    assert [(e["action"], e["actor"]) for e in audit] == [("webhook_delivery.retry", staff_id)]


async def test_deliveries_are_paged_and_filtered_as_the_api_pages_them(
    browser: httpx.AsyncClient,
    api: ApiClient,
    db: Database,
    settings: Settings,
    receiver: WebhookReceiver,
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    endpoint = await create_endpoint(api, receiver.url("many"), ["alert.raised"])
    await emit_alerts(db, 23)
    await settle(db, settings)
    page_path = f"{PAGE}/{endpoint['id']}"

    first = await browser.get(page_path)
    older = re.search(r'href="(/console/webhooks/whk_[0-9a-z]+\?cursor=[^"]+)"', first.text)
    assert older is not None
    second = await browser.get(older.group(1).replace("&amp;", "&"))

    everything = await api_deliveries(api, endpoint["id"], limit=100)
    assert len(everything) == 23
    assert shown_deliveries(first) == from_api(everything[:20])
    assert shown_deliveries(second) == from_api(everything[20:])
    assert "Older deliveries" not in second.text
    failed_only = await browser.get(page_path, params={"status": "failed"})
    assert shown_deliveries(failed_only) == []
    assert "No deliveries with this status" in failed_only.text


async def test_recover_requeues_the_failed_deliveries_of_the_window_as_the_api_does(
    browser: httpx.AsyncClient,
    api: ApiClient,
    db: Database,
    settings: Settings,
    receiver: WebhookReceiver,
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    endpoint, before = await failed_delivery(api, db, settings, receiver, "outage")
    since = utcnow()
    await api.create_member()
    await api.create_member()
    await settle(db, settings)
    until = utcnow()
    page_path = f"{PAGE}/{endpoint['id']}"
    assert len(await api_deliveries(api, endpoint["id"], status="failed")) == 3
    receiver.set_handler("outage", None)
    # As a datetime-local field sends them: no zone, read as UTC.
    window = {
        "since": since.replace(tzinfo=None).isoformat(timespec="microseconds"),
        "until": until.replace(tzinfo=None).isoformat(timespec="microseconds"),
    }

    recovered = await submit(browser, page_path, f"{page_path}/recover", window)

    assert recovered.status_code == 303, recovered.text
    assert "2 failed deliveries queued" in (await browser.get(page_path)).text
    pending = await api_deliveries(api, endpoint["id"], status="pending")
    assert len(pending) == 2
    assert before["id"] not in {d["id"] for d in pending}
    await settle(db, settings)
    assert len(await api_deliveries(api, endpoint["id"], status="succeeded")) == 2
    again = await submit(browser, page_path, f"{page_path}/recover", window)
    assert again.status_code == 303
    assert "0 failed deliveries queued" in (await browser.get(page_path)).text


@pytest.mark.parametrize(
    "window",
    [
        {"since": "yesterday"},
        {"since": ""},
        {"since": "2026-01-02T00:00", "until": "2026-01-01T00:00"},
        {"since": "2026-01-01T00:00", "until": "2026-01-01T00:00"},
        {"since": "2026-13-01T00:00"},
        {},
    ],
)
async def test_a_bad_recover_window_is_refused_and_requeues_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, window: dict[str, str]
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    endpoint = await create_endpoint(api, "https://93.184.215.14/h", ["*"])
    page_path = f"{PAGE}/{endpoint['id']}"

    refused = await submit(browser, page_path, f"{page_path}/recover", window)

    assert refused.status_code == 422, refused.text
    assert '<p class="error" role="alert">' in refused.text
    audit = (await api.get("/api/v1/audit", {"object_id": endpoint["id"]})).json()["data"]
    assert "webhook_endpoint.recover" not in [e["action"] for e in audit]


# ---------------------------------------------------------------- endpoint state


async def test_disable_enable_rotate_and_test_events_act_as_the_api_does(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    endpoint = await create_endpoint(api, "https://93.184.215.14/h", ["*"])
    page_path = f"{PAGE}/{endpoint['id']}"

    disabled = await submit(browser, page_path, f"{page_path}/disable", {"reason": "Maintenance"})
    assert disabled.status_code == 303
    shown = (await api.get(f"{ENDPOINTS}/{endpoint['id']}")).json()
    assert (shown["enabled"], shown["disabled_reason"]) == (False, "Maintenance")
    page = await browser.get(page_path)
    assert "disabled" in page.text
    assert "Maintenance" in page.text
    assert f"{page_path}/test" not in page.text
    token = csrf_of(page)
    refused = await browser.post(f"{page_path}/test", data={"csrf_token": token})
    assert refused.status_code == 409
    assert "enable it first" in refused.text

    enabled = await browser.post(f"{page_path}/enable", data={"csrf_token": token})
    assert enabled.status_code == 303
    assert (await api.get(f"{ENDPOINTS}/{endpoint['id']}")).json()["enabled"] is True

    sent = await browser.post(f"{page_path}/test", data={"csrf_token": token, "message": "ping"})
    assert sent.status_code == 303
    events = (await api.get("/api/v1/events", {"type": "webhook.test"})).json()["data"]
    assert [e["data"] for e in events] == [{"endpoint_id": endpoint["id"], "message": "ping"}]
    assert events[0]["id"] in (await browser.get(page_path)).text

    rotated = await browser.post(f"{page_path}/rotate-secret", data={"csrf_token": token})
    assert rotated.status_code == 200
    match = SECRET.search(rotated.text)
    assert match is not None
    assert match.group(1).startswith("whsec_")
    assert match.group(1) != endpoint["secret"]
    after = (await api.get(f"{ENDPOINTS}/{endpoint['id']}")).json()
    assert after["previous_secret_expires_at"] is not None
    assert match.group(1) not in (await browser.get(page_path)).text

    too_long = await browser.post(
        f"{page_path}/test", data={"csrf_token": token, "message": "x" * 201}
    )
    assert too_long.status_code == 422
    nul = await browser.post(f"{page_path}/disable", data={"csrf_token": token, "reason": "\x00"})
    assert nul.status_code == 422
    assert (await api.get(f"{ENDPOINTS}/{endpoint['id']}")).json()["enabled"] is True
    unexplained = await browser.post(f"{page_path}/disable", data={"csrf_token": token})
    assert unexplained.status_code == 303
    shown = (await api.get(f"{ENDPOINTS}/{endpoint['id']}")).json()
    assert (shown["enabled"], shown["disabled_reason"]) == (False, "Disabled in the console.")


# ---------------------------------------------------------------- who may do what


async def test_support_agents_get_403_and_managers_may_only_look(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    endpoint = await create_endpoint(api, "https://93.184.215.14/h", ["*"])
    page_path = f"{PAGE}/{endpoint['id']}"
    await create_staff_user(db, "agent@example.org", role="support_agent")
    await create_staff_user(db, "manager@example.org", role="manager")

    await sign_in(browser, "agent@example.org")
    for path in (PAGE, page_path):
        refused = await browser.get(path)
        assert refused.status_code == 403, path
        assert "webhooks:read" in refused.text
    assert 'href="/console/webhooks"' not in (await browser.get("/console")).text
    await browser.post(
        "/console/sign-out", data={"csrf_token": csrf_of(await browser.get("/console"))}
    )

    await sign_in(browser, "manager@example.org")
    listing = await browser.get(PAGE)
    assert listing.status_code == 200
    assert endpoint["id"] in listing.text
    assert "Register an endpoint" not in listing.text
    page = await browser.get(page_path)
    assert page.status_code == 200
    assert "rotate-secret" not in page.text
    token = csrf_of(page)
    for action, fields in [
        (PAGE, {"url": "https://93.184.215.14/x", "event_types": "*"}),
        (f"{page_path}/disable", {}),
        (f"{page_path}/rotate-secret", {}),
        (f"{page_path}/test", {}),
        (f"{page_path}/recover", {"since": "2026-01-01T00:00"}),
        (f"{PAGE}/deliveries/dlv_whatever/retry", {}),
    ]:
        refused = await browser.post(action, data={"csrf_token": token, **fields})
        assert refused.status_code == 403, action
        assert "webhooks:write" in refused.text
    assert await endpoint_count(db) == 1
    shown = (await api.get(f"{ENDPOINTS}/{endpoint['id']}")).json()
    assert shown["enabled"] is True
    assert shown["previous_secret_expires_at"] is None


async def test_an_org_bound_admin_cannot_reach_another_organisations_endpoint(
    browser: httpx.AsyncClient,
    api: ApiClient,
    db: Database,
    settings: Settings,
    receiver: WebhookReceiver,
) -> None:
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    their_api = api.with_key(await issue_key(db, Role.ADMIN, organisation=theirs))
    their_endpoint, their_delivery = await failed_delivery(
        their_api, db, settings, receiver, "theirs"
    )
    await create_staff_user(db, organisation=mine)
    await sign_in(browser)

    listing = await browser.get(PAGE)
    assert their_endpoint["id"] not in listing.text
    assert 'name="organisation_id"' not in listing.text
    hidden = await browser.get(f"{PAGE}/{their_endpoint['id']}")
    assert hidden.status_code == 404
    assert "does not exist" in hidden.text
    token = csrf_of(listing)
    path = f"{PAGE}/{their_endpoint['id']}"
    since = (utcnow() - timedelta(hours=1)).replace(tzinfo=None).isoformat()
    for action, fields in [
        (f"{path}/disable", {}),
        (f"{path}/rotate-secret", {}),
        (f"{path}/test", {}),
        (f"{path}/recover", {"since": since}),
        (f"{PAGE}/deliveries/{their_delivery['id']}/retry", {}),
    ]:
        refused = await browser.post(action, data={"csrf_token": token, **fields})
        assert refused.status_code == 404, action
    shown = (await their_api.get(f"{ENDPOINTS}/{their_endpoint['id']}")).json()
    assert shown["enabled"] is True
    assert shown["previous_secret_expires_at"] is None
    assert (await their_api.get(f"/api/v1/deliveries/{their_delivery['id']}")).json()[
        "status"
    ] == "failed"

    created = await register(browser, url="https://93.184.215.14/mine", event_types="*")
    assert created.status_code == 201, created.text
    mine_listed = (await api.get(ENDPOINTS)).json()["data"]
    assert {e["url"]: e["organisation_id"] for e in mine_listed}[
        "https://93.184.215.14/mine"
    ] == mine


async def test_forms_posted_without_their_csrf_token_are_refused_and_change_nothing(
    browser: httpx.AsyncClient,
    api: ApiClient,
    db: Database,
    settings: Settings,
    receiver: WebhookReceiver,
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    endpoint, failed = await failed_delivery(api, db, settings, receiver, "csrf")
    path = f"{PAGE}/{endpoint['id']}"
    for action, fields in [
        (PAGE, {"url": "https://93.184.215.14/x", "event_types": "*"}),
        (f"{path}/disable", {}),
        (f"{path}/rotate-secret", {}),
        (f"{PAGE}/deliveries/{failed['id']}/retry", {}),
    ]:
        for token in (None, "forged"):
            sent = dict(fields) if token is None else {"csrf_token": token, **fields}
            refused = await browser.post(action, data=sent)
            assert refused.status_code == 403, action
            assert "out of date" in refused.text
    assert await endpoint_count(db) == 1
    shown = (await api.get(f"{ENDPOINTS}/{endpoint['id']}")).json()
    assert (shown["enabled"], shown["previous_secret_expires_at"]) == (True, None)
    assert (await api.get(f"/api/v1/deliveries/{failed['id']}")).json() == failed


async def test_no_webhook_page_answers_500_to_a_fuzzed_query_string(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    endpoint = await create_endpoint(api, "https://93.184.215.14/h", ["*"])
    paths = [PAGE, f"{PAGE}/{endpoint['id']}", f"{PAGE}/whk_nothere", f"{PAGE}/NOT-AN-ID"]
    chooser = random.Random(11)
    values = ["", "%", "\x00", "'", "failed", "x" * 600, "-1", "eyJhZnRlciI6LTF9", "é", "e30"]
    names = ["cursor", "status", "limit", "x"]
    for _ in range(60):
        query = {chooser.choice(names): chooser.choice(values) for _ in range(2)}
        for path in paths:
            got = await browser.get(path, params=query)
            assert got.status_code < 500, (path, query, got.text[:300])
    for raw in ("cursor=%FF%FE", "status=%00", "%", "=&=&", "cursor=eyJhZnRlciI6MWUxMDB9"):
        for path in paths:
            got = await browser.get(f"{path}?{raw}")
            assert got.status_code < 500, (path, raw, got.text[:300])
