"""The alerts pages: open and acknowledged alerts with filters, the detail page, and
acknowledging from the console as `GET /api/v1/alerts` then shows it; organisation limits,
roles, CSRF and bad input."""

from __future__ import annotations

from typing import Any

import httpx

from memberhub.kit.db import Database
from tests.alerts.conftest import alerts, award, redeem, set_program
from tests.console.support import create_staff_user, csrf_of, sign_in, submit
from tests.support import ApiClient

ALERTS_PAGE = "/console/alerts"


async def large_redemption_alert(api: ApiClient, **member_fields: Any) -> dict[str, Any]:
    """An open LARGE_REDEMPTION alert for a new member (the threshold lowered to 50)."""
    await set_program(api, alert_thresholds={"large_redemption_points": 50})
    member = await api.create_member(**member_fields)
    await award(api, member["id"], 500)
    await redeem(api, member["id"], 51)
    (alert,) = [a for a in await alerts(api) if a["member_id"] == member["id"]]
    return alert


async def test_an_alert_acknowledged_in_the_console_is_acknowledged_in_the_api(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    alert = await large_redemption_alert(api)
    manager_id = await create_staff_user(db, "mia@example.org", role="manager")
    await sign_in(browser, "mia@example.org")

    listed = await browser.get(ALERTS_PAGE)
    assert listed.status_code == 200
    row = listed.text.split(f'data-id="{alert["id"]}"')[1].split("</tr>")[0]
    assert "LARGE_REDEMPTION" in row
    assert alert["member_id"] in row
    assert ">open<" in row

    detail_url = f"{ALERTS_PAGE}/{alert['id']}"
    done = await submit(
        browser, detail_url, f"{detail_url}/acknowledge", {"note": "Called the member"}
    )
    assert done.status_code == 303, done.text
    page = await browser.get(detail_url)
    assert "acknowledged" in page.text
    assert manager_id in page.text

    (shown,) = await alerts(api, status="acknowledged")
    assert (shown["id"], shown["acknowledged_by"], shown["note"]) == (
        alert["id"],
        manager_id,
        "Called the member",
    )
    assert await alerts(api, status="open") == []
    assert alert["id"] not in (await browser.get(ALERTS_PAGE)).text
    assert alert["id"] in (await browser.get(ALERTS_PAGE, params={"status": "acknowledged"})).text
    filtered = await browser.get(
        ALERTS_PAGE, params={"status": "all", "type": "NEGATIVE_BALANCE", "priority": ""}
    )
    assert alert["id"] not in filtered.text

    again = await submit(browser, detail_url, f"{detail_url}/acknowledge", {})
    assert again.status_code == 409
    assert "already acknowledged" in again.text
    (still,) = await alerts(api)
    assert still["note"] == "Called the member"


async def test_a_support_agent_reads_alerts_but_cannot_acknowledge(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    alert = await large_redemption_alert(api)
    await create_staff_user(db, "sam@example.org", role="support_agent")
    await sign_in(browser, "sam@example.org")

    page = await browser.get(f"{ALERTS_PAGE}/{alert['id']}")
    assert page.status_code == 200
    assert "/acknowledge" not in page.text
    refused = await browser.post(
        f"{ALERTS_PAGE}/{alert['id']}/acknowledge", data={"csrf_token": csrf_of(page)}
    )
    assert refused.status_code == 403
    assert "alerts:write" in refused.text
    assert (await alerts(api))[0]["status"] == "open"


async def test_an_org_bound_manager_sees_only_their_organisations_alerts(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    own = await large_redemption_alert(api, organisation_id=mine)
    other = await large_redemption_alert(api, organisation_id=theirs)
    await create_staff_user(db, "mia@example.org", role="manager", organisation=mine)
    await sign_in(browser, "mia@example.org")

    listed = await browser.get(ALERTS_PAGE, params={"status": "all"})
    assert own["id"] in listed.text
    assert other["id"] not in listed.text
    assert (await browser.get(f"{ALERTS_PAGE}/{other['id']}")).status_code == 404
    refused = await browser.post(
        f"{ALERTS_PAGE}/{other['id']}/acknowledge", data={"csrf_token": csrf_of(listed)}
    )
    assert refused.status_code == 404
    assert {a["id"]: a["status"] for a in await alerts(api)} == {
        own["id"]: "open",
        other["id"]: "open",
    }


async def test_acknowledging_without_the_csrf_token_or_with_bad_input_changes_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    alert = await large_redemption_alert(api)
    await create_staff_user(db)
    await sign_in(browser)
    action = f"{ALERTS_PAGE}/{alert['id']}/acknowledge"
    for token in (None, "", "forged"):
        fields = {} if token is None else {"csrf_token": token}
        assert (await browser.post(action, data=fields)).status_code == 403
    token = csrf_of(await browser.get(ALERTS_PAGE))
    too_long = await browser.post(action, data={"csrf_token": token, "note": "n" * 1001})
    assert too_long.status_code == 422
    assert (await alerts(api))[0]["status"] == "open"
    for params in (
        {"status": "closed"},
        {"type": "large_redemption"},
        {"priority": "urgent"},
        {"cursor": "%%%"},
        {"status": "open", "type": "LARGE_REDEMPTION|x"},
    ):
        answered = await browser.get(ALERTS_PAGE, params=params)
        assert answered.status_code == 422, params
        assert "<h1>" in answered.text
