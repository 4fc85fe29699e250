"""The integrations dashboard and an integration's page: the numbers of the sync status,
activity and health APIs, runs and their records, settling a conflict and starting a sync
from the page, for the staff user's role and organisations only."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from memberhub.crm.models import SyncRun
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.console.support import create_staff_user, csrf_of, sign_in, submit
from tests.console.test_dashboard_pages import fuzzed_queries, shown

# The CRM fixtures: HubSpot's fake and the integration hub the worker uses.
from tests.crm.conftest import (  # noqa: F401
    CRM_CONSENT,
    HUBSPOT_TOKEN,
    Crm,
    create_integration,
    hub,
    hubspot,
    sync,
    tick,
)
from tests.fakes.hubspot import FakeHubSpot
from tests.support import ApiClient

DASHBOARD = "/console/integrations"


@pytest.fixture
async def crm(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,  # noqa: F811
    hubspot: FakeHubSpot,  # noqa: F811
) -> dict[str, Any]:
    """Organisation 1's HubSpot under manual review: Ana pushed, a lead imported by a pull
    that also found Ana's first name changed on both sides (an open conflict).
    Organisation 2 has an integration of its own, disabled, never synced."""
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    member = await api.create_member(
        organisation_id=mine, first_name="Ana", last_name="Lim", consent=CRM_CONSENT
    )
    body = Crm("hubspot", hubspot).integration_body(conflict_policy="manual")
    integration = await create_integration(api, {**body, "organisation_id": mine})
    other = await create_integration(
        api, {**body, "name": "Their HubSpot", "organisation_id": theirs}
    )
    # Disabled, so the worker's first pull does not import the fake's contacts through it.
    disabled = await api.post(f"/api/v1/integrations/{other['id']}/disable", {})
    assert disabled.status_code == 200
    pushed = await sync(api, db, hub, integration["id"], mode="push")
    assert pushed["created"] == 1, pushed
    [contact_id] = [
        cid for cid, p in hubspot.contacts.items() if p["email"] == member["email"].lower()
    ]
    hubspot.add_contact({"email": "new.lead@example.com", "firstname": "Neo"})
    hubspot.update_contact(contact_id, {"firstname": "Crm"})
    changed = await api.patch(f"/api/v1/members/{member['id']}", {"first_name": "Local"})
    assert changed.status_code == 200
    pulled = await sync(api, db, hub, integration["id"], mode="pull")
    assert (pulled["conflicts"], pulled["created"]) == (1, 1), pulled
    await hub.drain()  # the calls' log, which health reads
    return {
        "mine": mine,
        "theirs": theirs,
        "member": member,
        "integration": integration,
        "other": other,
        "pull": pulled,
    }


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} %"


def row_of(html: str, attribute: str, value: str) -> str:
    match = re.search(rf'<tr {attribute}="{value}">(.*?)</tr>', html, re.S)
    assert match is not None, value
    return match.group(1)


def cell(row: str, css_class: str) -> str:
    match = re.search(rf'<td class="{css_class}">([^<]*)</td>', row)
    assert match is not None, css_class
    return match.group(1)


async def signed_in_as(
    browser: httpx.AsyncClient, db: Database, role: str, organisation: str | None = None
) -> str:
    staff_id = await create_staff_user(db, f"{role}@example.org", role, organisation=organisation)
    response = await sign_in(browser, f"{role}@example.org")
    assert response.status_code == 303, response.text
    return staff_id


async def open_conflicts(api: ApiClient, integration_id: str) -> list[dict[str, Any]]:
    path = f"/api/v1/integrations/{integration_id}/conflicts"
    return list((await api.get(path, {"status": "open"})).json()["data"])


async def test_the_dashboard_shows_the_apis_numbers(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "admin")

    page = await browser.get(DASHBOARD)

    assert page.status_code == 200, page.text
    html = page.text
    status = (await api.get("/api/v1/sync/status")).json()
    external = (await api.get("/api/v1/external/sync/status")).json()
    activity = (await api.get("/api/v1/external/sync/activity")).json()
    assert shown(html, "connected-count") == str(len(status["connected"]))
    pending = status["pending_updates"] + external["pending_updates"]
    assert shown(html, "pending-updates") == str(pending)
    assert shown(html, "sync-errors") == str(status["sync_errors"] + external["sync_errors"])
    assert shown(html, "open-conflicts") == str(external["open_conflicts"]) == "1"
    incidents = [i for i in status["integrations"] if i["open_incident_since"]]
    assert shown(html, "open-incidents") == str(len(incidents))
    assert activity["leads_imported"] >= 1
    assert shown(html, "leads-imported") == str(activity["leads_imported"])
    assert shown(html, "leads-updated") == str(activity["leads_updated"])
    assert shown(html, "records-failed") == str(activity["records_failed"])
    assert shown(html, "runs-today") == str(activity["runs"])
    assert shown(html, "run-success-rate") == percent(activity["success_rate"])
    average = activity["average_run_seconds"]
    assert shown(html, "average-sync") == f"{average:.1f} s"
    calls = succeeded = 0
    uptimes: list[float] = []
    for item in status["integrations"]:
        health = (await api.get(f"/api/v1/integrations/{item['id']}/health")).json()
        row = row_of(html, "data-integration", item["id"])
        assert item["name"] in row
        assert cell(row, "pending") == str(item["inbound_pending"])
        assert cell(row, "failed") == str(item["inbound_failed"])
        assert cell(row, "success-rate") == percent(health["success_rate"])
        assert cell(row, "uptime") == f"{health['uptime_percent']:.2f} %"
        uptimes.append(health["uptime_percent"])
        calls += health["calls"]
        succeeded += health["succeeded"]
    assert calls > 0
    assert shown(html, "call-success-rate") == percent(round(100 * succeeded / calls, 2))
    assert shown(html, "uptime") == f"{sum(uptimes) / len(uptimes):.2f} %"
    assert HUBSPOT_TOKEN not in html
    assert "hubspot-app-secret" not in html


async def test_an_integrations_page_lists_its_runs_and_open_conflicts(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "admin")
    integration_id = crm["integration"]["id"]

    page = await browser.get(f"{DASHBOARD}/{integration_id}")

    assert page.status_code == 200, page.text
    html = page.text
    runs = (await api.get(f"/api/v1/integrations/{integration_id}/runs")).json()["data"]
    assert re.findall(r'<tr data-run="([^"]+)">', html) == [r["id"] for r in runs]
    [conflict] = await open_conflicts(api, integration_id)
    row = row_of(html, "data-conflict", conflict["id"])
    assert "first_name" in row
    assert "Local" in row
    assert "Crm" in row
    health = (await api.get(f"/api/v1/integrations/{integration_id}/health")).json()
    assert shown(html, "health-calls") == str(health["calls"])
    assert shown(html, "health-success-rate") == percent(health["success_rate"])
    assert shown(html, "health-uptime") == f"{health['uptime_percent']:.2f} %" == "100.00 %"
    # Which credentials are set, never their values nor their last characters.
    assert "access_token" in html
    assert HUBSPOT_TOKEN not in html
    hint = f"…{HUBSPOT_TOKEN[-4:]}"
    listed = (await api.get(f"/api/v1/integrations/{integration_id}")).json()
    assert listed["credentials"]["access_token"] == hint  # what the API shows of it
    assert hint not in html
    assert "hubspot-app-secret" not in html


async def test_a_runs_page_lists_its_records_as_the_api_does(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "admin")
    integration_id, run_id = crm["integration"]["id"], crm["pull"]["id"]
    url = f"{DASHBOARD}/{integration_id}/runs/{run_id}"
    records = (await api.get(f"/api/v1/sync-runs/{run_id}/records")).json()["data"]

    page = await browser.get(url)

    assert page.status_code == 200, page.text
    outcomes = re.findall(r"</td>\s*<td>(created|updated|failed|conflict)</td>", page.text)
    assert outcomes == [r["outcome"] for r in records]
    assert sorted(outcomes) == ["conflict", "created"]
    only = await browser.get(url, params={"outcome": "conflict"})
    assert re.findall(r"<td>(created|updated|failed|conflict)</td>", only.text) == ["conflict"]
    everything = await browser.get(url, params={"outcome": ""})
    assert everything.status_code == 200
    assert (await browser.get(url, params={"outcome": "deleted"})).status_code == 422
    # A run is only shown under its own integration's address.
    elsewhere = await browser.get(f"{DASHBOARD}/{crm['other']['id']}/runs/{run_id}")
    assert elsewhere.status_code == 404


async def test_resolving_a_conflict_from_the_page_is_what_the_api_does(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, crm: dict[str, Any]
) -> None:
    staff_id = await signed_in_as(browser, db, "admin")
    integration_id = crm["integration"]["id"]
    [conflict] = await open_conflicts(api, integration_id)
    page_url = f"{DASHBOARD}/{integration_id}"
    action = f"{DASHBOARD}/conflicts/{conflict['id']}/resolve"

    resolved = await submit(browser, page_url, action, {"keep": "crm"})

    assert resolved.status_code == 303, resolved.text
    assert resolved.headers["location"] == page_url
    after = await browser.get(page_url)
    assert "resolved: kept the CRM&#39;s first_name" in after.text
    assert f'data-conflict="{conflict["id"]}"' not in after.text
    listed = (await api.get(f"/api/v1/integrations/{integration_id}/conflicts")).json()["data"]
    assert [(c["status"], c["resolution"], c["resolved_by"]) for c in listed] == [
        ("resolved", "crm", staff_id)
    ]
    member = (await api.get(f"/api/v1/members/{crm['member']['id']}")).json()
    assert member["first_name"] == "Crm"
    again = await submit(browser, page_url, action, {"keep": "memberhub"})
    assert again.status_code == 409
    assert "already resolved" in again.text


async def test_starting_a_sync_from_the_page_queues_a_run_as_the_api_does(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, crm: dict[str, Any]
) -> None:
    staff_id = await signed_in_as(browser, db, "admin")
    integration_id = crm["integration"]["id"]
    page_url = f"{DASHBOARD}/{integration_id}"
    action = f"{page_url}/sync"

    started = await submit(browser, page_url, action, {"mode": "pull", "dry_run": "on"})

    assert started.status_code == 303, started.text
    [latest, *_] = (await api.get(f"/api/v1/integrations/{integration_id}/runs")).json()["data"]
    assert (latest["mode"], latest["dry_run"], latest["status"]) == ("pull", True, "queued")
    assert latest["requested_by"] == staff_id
    assert latest["id"] in (await browser.get(page_url)).text
    pushed = await submit(browser, page_url, action, {"mode": "push"})
    assert pushed.status_code == 303
    [newest, *_] = (await api.get(f"/api/v1/integrations/{integration_id}/runs")).json()["data"]
    assert (newest["mode"], newest["dry_run"]) == ("push", False)


async def run_count(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(SyncRun)) or 0)


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"keep": "both"}, 422),
        ({"keep": ""}, 422),
        ({}, 422),
        ({"mode": "sideways"}, 422),
        ({"mode": "push", "dry_run": "yes please"}, 422),
    ],
)
async def test_bad_form_values_are_refused_and_change_nothing(
    browser: httpx.AsyncClient,
    api: ApiClient,
    db: Database,
    crm: dict[str, Any],
    fields: dict[str, str],
    status: int,
) -> None:
    await signed_in_as(browser, db, "admin")
    integration_id = crm["integration"]["id"]
    [conflict] = await open_conflicts(api, integration_id)
    page_url = f"{DASHBOARD}/{integration_id}"
    action = (
        f"{page_url}/sync"
        if "mode" in fields
        else f"{DASHBOARD}/conflicts/{conflict['id']}/resolve"
    )
    runs = await run_count(db)
    refused = await submit(browser, page_url, action, fields)
    assert refused.status_code == status
    assert "<h1>" in refused.text
    assert await run_count(db) == runs
    assert [c["id"] for c in await open_conflicts(api, integration_id)] == [conflict["id"]]


async def test_unknown_and_malformed_ids_get_error_pages(
    browser: httpx.AsyncClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "admin")
    page = await browser.get(f"{DASHBOARD}/{crm['integration']['id']}")
    token = csrf_of(page)
    assert (await browser.get(f"{DASHBOARD}/int_doesnotexist")).status_code == 404
    assert (await browser.get(f"{DASHBOARD}/not-an-id")).status_code == 422
    missing = await browser.post(
        f"{DASHBOARD}/conflicts/cfl_nothere/resolve", data={"csrf_token": token, "keep": "crm"}
    )
    assert missing.status_code == 404
    assert (
        await browser.post(
            f"{DASHBOARD}/conflicts/..%2F/resolve", data={"csrf_token": token, "keep": "crm"}
        )
    ).status_code in (404, 422)


async def test_posts_without_the_csrf_token_are_refused_and_change_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "admin")
    integration_id = crm["integration"]["id"]
    [conflict] = await open_conflicts(api, integration_id)
    runs = await run_count(db)
    for token in (None, "", "forged"):
        extra = {} if token is None else {"csrf_token": token}
        resolve = await browser.post(
            f"{DASHBOARD}/conflicts/{conflict['id']}/resolve", data={"keep": "crm", **extra}
        )
        start = await browser.post(
            f"{DASHBOARD}/{integration_id}/sync", data={"mode": "push", **extra}
        )
        assert (resolve.status_code, start.status_code) == (403, 403)
    assert await run_count(db) == runs
    assert [c["id"] for c in await open_conflicts(api, integration_id)] == [conflict["id"]]


async def test_a_manager_sees_the_pages_but_cannot_resolve_or_sync(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "manager")
    integration_id = crm["integration"]["id"]
    [conflict] = await open_conflicts(api, integration_id)
    page_url = f"{DASHBOARD}/{integration_id}"
    page = await browser.get(page_url)
    assert page.status_code == 200
    assert conflict["id"] in page.text
    assert "/resolve" not in page.text
    assert "Start sync" not in page.text
    token = csrf_of(page)
    resolve = await browser.post(
        f"{DASHBOARD}/conflicts/{conflict['id']}/resolve", data={"csrf_token": token, "keep": "crm"}
    )
    start = await browser.post(f"{page_url}/sync", data={"csrf_token": token, "mode": "push"})
    assert (resolve.status_code, start.status_code) == (403, 403)
    assert "integrations:write" in resolve.text
    assert [c["id"] for c in await open_conflicts(api, integration_id)] == [conflict["id"]]


async def test_a_role_without_integrations_is_refused(
    browser: httpx.AsyncClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "support_agent")
    assert (await browser.get(DASHBOARD)).status_code == 403
    assert (await browser.get(f"{DASHBOARD}/{crm['integration']['id']}")).status_code == 403
    assert 'href="/console/integrations"' not in (await browser.get("/console")).text


async def test_an_org_bound_staff_user_sees_their_organisations_integrations_only(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "admin", organisation=crm["theirs"])
    dashboard = await browser.get(DASHBOARD)
    assert crm["other"]["id"] in dashboard.text
    assert crm["integration"]["id"] not in dashboard.text
    assert shown(dashboard.text, "open-conflicts") == "0"
    assert shown(dashboard.text, "leads-imported") == "0"
    hidden = await browser.get(f"{DASHBOARD}/{crm['integration']['id']}")
    assert hidden.status_code == 404
    run = await browser.get(f"{DASHBOARD}/{crm['integration']['id']}/runs/{crm['pull']['id']}")
    assert run.status_code == 404
    [conflict] = await open_conflicts(api, crm["integration"]["id"])
    token = csrf_of(dashboard)
    refused = await browser.post(
        f"{DASHBOARD}/conflicts/{conflict['id']}/resolve", data={"csrf_token": token, "keep": "crm"}
    )
    assert refused.status_code == 404
    started = await browser.post(
        f"{DASHBOARD}/{crm['integration']['id']}/sync", data={"csrf_token": token, "mode": "push"}
    )
    assert started.status_code == 404
    assert await open_conflicts(api, crm["integration"]["id"]) == [conflict]


async def test_a_disabled_integration_cannot_be_synced_from_the_page(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "admin")
    integration_id = crm["integration"]["id"]
    assert (await api.post(f"/api/v1/integrations/{integration_id}/disable", {})).status_code == 200
    page_url = f"{DASHBOARD}/{integration_id}"
    refused = await submit(browser, page_url, f"{page_url}/sync", {"mode": "push"})
    assert refused.status_code == 409
    assert "disabled" in refused.text


async def test_fuzzed_query_strings_never_fail_the_pages(
    browser: httpx.AsyncClient, db: Database, crm: dict[str, Any]
) -> None:
    await signed_in_as(browser, db, "admin")
    integration_id = crm["integration"]["id"]
    paths = [
        DASHBOARD,
        f"{DASHBOARD}/{integration_id}",
        f"{DASHBOARD}/{integration_id}/runs/{crm['pull']['id']}",
    ]
    for index, query in enumerate(fuzzed_queries(["outcome", "status", "since", "x"], 45)):
        path = paths[index % len(paths)]
        response = await browser.get(path, params=query)
        assert response.status_code < 500, (path, query, response.status_code)


def test_the_start_of_today_is_midnight_utc() -> None:
    from memberhub.console.pages.integrations import start_of_day

    moment = utcnow()
    start = start_of_day(moment)
    assert timedelta(0) <= moment - start < timedelta(days=1)
    assert (start.hour, start.minute, start.second, start.microsecond) == (0, 0, 0, 0)


async def test_an_integration_that_is_not_a_crm_has_a_page_without_runs(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    secret = "whsec-inbound-signing-secret-0123456789"
    created = await api.post(
        "/api/v1/integrations",
        {
            "provider": "webhook",
            "name": "Bookings",
            "config": {"scheme": "standard"},
            "credentials": {"signing_secret": secret},
        },
    )
    assert created.status_code == 201, created.text
    integration_id = created.json()["id"]
    await signed_in_as(browser, db, "admin")

    page = await browser.get(f"{DASHBOARD}/{integration_id}")

    assert page.status_code == 200, page.text
    assert "does not sync with a CRM" in page.text
    assert "Start sync" not in page.text
    assert "signing_secret set" in page.text
    assert secret not in page.text
    assert f"…{secret[-4:]}" not in page.text
    refused = await browser.post(
        f"{DASHBOARD}/{integration_id}/sync", data={"csrf_token": csrf_of(page), "mode": "push"}
    )
    assert refused.status_code == 409
    assert await run_count(db) == 0
    dashboard = await browser.get(DASHBOARD)
    assert row_of(dashboard.text, "data-integration", integration_id)
