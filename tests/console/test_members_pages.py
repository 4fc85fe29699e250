"""The console's members pages: search, the member's points widget and history, and the
quick actions, each checked against what the JSON API reports afterwards."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from memberhub.console.pages import members as members_page
from memberhub.console.pages.members import format_money
from memberhub.kit.db import Database
from tests.console.support import create_staff_user, csrf_of, sign_in, submit
from tests.support import ApiClient

MEMBER_LINK = re.compile(r'href="/console/members/(mem_[0-9a-z]+)"')


def linked_members(page: httpx.Response) -> list[str]:
    return MEMBER_LINK.findall(page.text)


def shown(page: httpx.Response, element_id: str) -> str:
    """The text of the element with this id (tags removed, spaces collapsed)."""
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</(dd|span|td|p)>', page.text, re.S)
    assert match is not None, (element_id, page.text)
    return " ".join(re.sub(r"<[^>]+>", " ", match.group(1)).split())


def shown_points(page: httpx.Response, element_id: str) -> int:
    match = re.match(r"(-?\d+) points", shown(page, element_id))
    assert match is not None, shown(page, element_id)
    return int(match.group(1))


async def points_of(api: ApiClient, member_id: str) -> dict[str, Any]:
    answered = await api.get(f"/api/v1/members/{member_id}/points")
    assert answered.status_code == 200, answered.text
    return dict(answered.json())


async def transactions_of(api: ApiClient, member_id: str) -> list[dict[str, Any]]:
    answered = await api.get(f"/api/v1/members/{member_id}/points/transactions")
    assert answered.status_code == 200, answered.text
    return list(answered.json()["data"])


async def award(api: ApiClient, member_id: str, points: int, **fields: Any) -> dict[str, Any]:
    body = {"member_id": member_id, "points": points, "reason": "Seed", **fields}
    answered = await api.post("/api/v1/points/award", body)
    assert answered.status_code == 201, answered.text
    return dict(answered.json())


async def post_form(
    browser: httpx.AsyncClient, member_id: str, action: str, fields: dict[str, Any]
) -> httpx.Response:
    page = f"/console/members/{member_id}"
    return await submit(browser, page, f"{page}/{action}", fields)


# ------------------------------------------------------------------ search


async def test_search_filters_match_the_api_list_for_each_filter(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    tier = {"code": "GOLD", "name": "Gold", "rank": 1, "threshold": 100000}
    assert (await api.post("/api/v1/tiers", tier)).status_code == 201
    plan = await api.create_plan()
    ada = await api.create_member(
        email="ada@example.org", first_name="Ada", last_name="Byron", external_ids={"crm": "7"}
    )
    bob = await api.create_member(email="bob@example.org", first_name="Bob")
    cyd = await api.create_member(email="cyd@example.org", first_name="Cyd", last_name="Adams")
    assigned = await api.post(
        "/api/v1/tiers/assign", {"member_id": bob["id"], "tier_code": "GOLD", "reason": "VIP"}
    )
    assert assigned.status_code == 200, assigned.text
    joined = await api.post(f"/api/v1/members/{cyd['id']}/membership/join", {"plan_id": plan["id"]})
    assert joined.status_code == 200, joined.text
    await create_staff_user(db, role="support_agent")
    await sign_in(browser)

    cases: list[tuple[dict[str, str], set[str]]] = [
        ({"email": "ADA@example.org"}, {ada["id"]}),
        ({"q": "ad"}, {ada["id"], cyd["id"]}),
        ({"q": "byron"}, {ada["id"]}),
        ({"external_id": "crm:7"}, {ada["id"]}),
        ({"tier": "GOLD"}, {bob["id"]}),
        ({"status": "active"}, {cyd["id"]}),
        ({"status": "pending", "q": "b"}, {ada["id"], bob["id"]}),
        ({}, {ada["id"], bob["id"], cyd["id"]}),
    ]
    for query, expected in cases:
        page = await browser.get("/console/members", params=query)
        assert page.status_code == 200, page.text
        assert set(linked_members(page)) == expected, query
        listed = await api.get("/api/v1/members", {**query})
        assert {m["id"] for m in listed.json()["data"]} == expected, query
    # A form sends its blank fields too: they filter nothing.
    blank = await browser.get(
        "/console/members",
        params={"email": "", "q": "", "external_id": "", "tier": "", "status": "cancelled"},
    )
    assert "No member matches" in blank.text
    assert linked_members(blank) == []


async def test_search_pages_with_a_next_link_that_keeps_the_filters(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(members_page, "SEARCH_PAGE_SIZE", 2)
    wanted = [(await api.create_member(first_name=f"Page{n}"))["id"] for n in range(5)]
    await api.create_member(first_name="Other")
    await create_staff_user(db)
    await sign_in(browser)
    seen: list[str] = []
    url: str | None = "/console/members?q=page"
    while url is not None:
        page = await browser.get(url)
        assert page.status_code == 200, page.text
        ids = linked_members(page)
        assert 1 <= len(ids) <= 2
        seen.extend(ids)
        found = re.search(r'<a href="([^"]+)" rel="next">', page.text)
        url = found.group(1).replace("&amp;", "&") if found else None
        if url is not None:
            assert "q=page" in url
    assert seen == wanted


# ------------------------------------------------------------------ the widget


async def test_the_points_widget_shows_the_numbers_the_api_gives(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    settings = {"currency": "EUR", "point_value_amount": 5, "point_value_points": 10}
    assert (await api.patch("/api/v1/program", settings)).status_code == 200
    for code, rank, threshold in (("SILVER", 1, 100), ("GOLD", 2, 2000)):
        tier = {"code": code, "name": code.title(), "rank": rank, "threshold": threshold}
        assert (await api.post("/api/v1/tiers", tier)).status_code == 201
    member = await api.create_member()
    soon = datetime.now(UTC) + timedelta(days=10)
    await award(api, member["id"], 300, expires_at=soon.isoformat())
    await award(api, member["id"], 1200)
    redeemed = await api.post(
        "/api/v1/points/redeem", {"member_id": member["id"], "points": 450, "reason": "Mug"}
    )
    assert redeemed.status_code == 201, redeemed.text
    await create_staff_user(db, role="manager")
    await sign_in(browser)

    page = await browser.get(f"/console/members/{member['id']}")
    assert page.status_code == 200, page.text
    summary = await points_of(api, member["id"])
    assert shown_points(page, "balance") == summary["current_balance"] == 1050
    assert shown_points(page, "pending-balance") == summary["pending_balance"]
    # 300 expiring, of which the redemption took the soonest-expiring first.
    assert shown_points(page, "expiring") == summary["expiring_balance"] == 0
    assert shown_points(page, "lifetime-earned") == summary["lifetime_earned"] == 1500
    assert shown_points(page, "lifetime-redeemed") == summary["lifetime_redeemed"] == 450
    assert shown_points(page, "lifetime-expired") == summary["lifetime_expired"] == 0
    assert summary["balance_value"] == 525
    assert summary["currency"] == "EUR"
    assert shown(page, "balance-value") == format_money(525, "EUR") == "5.25 EUR"
    assert summary["tier"]["code"] == "SILVER"
    assert "SILVER" in shown(page, "tier")
    assert summary["next_tier"]["code"] == "GOLD"
    assert int(shown(page, "points-to-next")) == summary["points_to_next_tier"] == 500
    assert 'max="2000" value="1500"' in page.text

    await award(api, member["id"], 80, expires_at=soon.isoformat())
    page = await browser.get(f"/console/members/{member['id']}")
    summary = await points_of(api, member["id"])
    assert shown_points(page, "expiring") == summary["expiring_balance"] == 80
    assert f"80 points valid through {soon:%Y-%m-%d}" in shown(page, "expiring")


async def test_points_expiring_at_the_calendars_end_show_east_of_utc(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    """An expiry the API accepts (9999-12-31 23:00 UTC) lies past the calendar's end in
    UTC+14: the member's page still opens, and shows its last day."""
    assert (await api.patch("/api/v1/program", {"timezone": "Pacific/Kiritimati"})).is_success
    member = await api.create_member()
    await award(api, member["id"], 10, expires_at="9999-12-31T23:00:00Z")
    await create_staff_user(db)
    await sign_in(browser)
    page = await browser.get(f"/console/members/{member['id']}")
    assert page.status_code == 200, page.text[:300]
    assert "9999-12-31" in page.text


async def test_the_transaction_history_pages_newest_first_with_the_actor(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(members_page, "HISTORY_PAGE_SIZE", 2)
    member = await api.create_member()
    for points in (1, 2, 3, 4, 5):
        await award(api, member["id"], points)
    await create_staff_user(db)
    await sign_in(browser)
    api_rows = await transactions_of(api, member["id"])
    url: str | None = f"/console/members/{member['id']}"
    shown_rows: list[str] = []
    while url is not None:
        page = await browser.get(url)
        assert page.status_code == 200, page.text
        shown_rows.extend(re.findall(r'<tr data-id="(txn_[0-9a-z]+)">', page.text))
        assert page.text.count('<td class="actor">') <= 2
        found = re.search(r'<a href="([^"]+)" rel="next">Older transactions', page.text)
        url = found.group(1).replace("&amp;", "&") if found else None
    assert shown_rows == [t["id"] for t in api_rows]
    assert len(shown_rows) == 5


# ------------------------------------------------------------------ quick actions


async def test_quick_actions_apply_as_the_staff_user(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    expires = datetime.now(UTC) + timedelta(days=5)
    await award(api, member["id"], 1000, expires_at=expires.isoformat())
    batches = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"]
    (batch,) = batches
    staff_id = await create_staff_user(db, role="admin")
    await sign_in(browser)

    new_day = (datetime.now(UTC) + timedelta(days=90)).date()
    extended = await post_form(
        browser,
        member["id"],
        "extend",
        {"batch_id": batch["id"], "expires_on": new_day.isoformat(), "reason": "Goodwill"},
    )
    assert extended.status_code == 303, extended.text
    after = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"]
    assert after[0]["expires_at"].startswith((new_day + timedelta(days=1)).isoformat())
    # The page names the day chosen: the last day the points can be used.
    offered = (await browser.get(f"/console/members/{member['id']}")).text
    assert f"1000 points valid through {new_day.isoformat()} ({batch['id']})" in offered

    redeemed = await post_form(
        browser, member["id"], "redeem", {"points": "100", "reason": "Voucher"}
    )
    assert redeemed.status_code == 303, redeemed.text
    deducted = await post_form(
        browser, member["id"], "deduct", {"points": "50", "reason": "Duplicate award"}
    )
    assert deducted.status_code == 303, deducted.text
    page = await browser.get(f"/console/members/{member['id']}")
    assert "Deducted 50 points." in page.text

    history = await transactions_of(api, member["id"])
    assert [(t["type"], t["points"], t["actor"]) for t in history[:3]] == [
        ("deduct", -50, staff_id),
        ("redeem", -100, staff_id),
        ("extend", 0, staff_id),
    ]
    assert history[0]["reason"] == "Duplicate award"
    assert (await points_of(api, member["id"]))["current_balance"] == 850
    assert shown_points(page, "balance") == 850


async def test_a_points_form_sent_twice_applies_once(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await create_staff_user(db, role="admin")
    await sign_in(browser)
    url = f"/console/members/{member['id']}"
    page = await browser.get(url)
    references = dict(
        re.findall(
            r'action="[^"]+/(award|redeem|deduct)".*?name="reference_id" value="([^"]+)"',
            page.text,
            re.S,
        )
    )
    assert set(references) == {"award", "redeem", "deduct"}
    assert len(set(references.values())) == 3
    for action, points in (("award", "300"), ("redeem", "20"), ("deduct", "30")):
        fields = {
            "csrf_token": csrf_of(page),
            "points": points,
            "reason": "Twice",
            "reference_id": references[action],
        }
        for _ in range(2):
            sent = await browser.post(f"{url}/{action}", data=fields)
            assert sent.status_code == 303, sent.text
        assert "already sent" in (await browser.get(url)).text
        # The same form with other points is a different operation: refused.
        changed = await browser.post(f"{url}/{action}", data={**fields, "points": "7"})
        assert changed.status_code == 409, changed.text
    history = await transactions_of(api, member["id"])
    assert [(t["type"], t["points"]) for t in history] == [
        ("deduct", -30),
        ("redeem", -20),
        ("award", 300),
    ]
    assert (await browser.get(url)).text.count('name="reference_id"') == 3


async def test_membership_join_renew_and_cancel_from_the_console(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    plan = await api.create_plan(term_months=1, renewal_window_days=60)
    member = await api.create_member()
    staff_id = await create_staff_user(db, role="manager")
    await sign_in(browser)

    joined = await post_form(
        browser, member["id"], "membership/join", {"plan_id": plan["id"], "note": "At the desk"}
    )
    assert joined.status_code == 303, joined.text
    assert (await api.get(f"/api/v1/members/{member['id']}")).json()["status"] == "active"
    renewed = await post_form(browser, member["id"], "membership/renew", {"plan_id": ""})
    assert renewed.status_code == 303, renewed.text
    terms = (await api.get(f"/api/v1/members/{member['id']}/membership/terms")).json()["data"]
    assert [t["kind"] for t in terms] == ["renew", "join"]  # newest first
    assert terms[0]["starts_at"] == terms[1]["ends_at"]

    cancelled = await post_form(browser, member["id"], "membership/cancel", {"note": "Moved away"})
    assert cancelled.status_code == 303, cancelled.text
    history = (await api.get(f"/api/v1/members/{member['id']}/status-history")).json()["data"]
    assert [(c["reason"], c["to_status"], c["actor"]) for c in history] == [
        ("join", "active", staff_id),
        ("renew", "active", staff_id),
        ("cancel", "cancelled", staff_id),
    ]
    page = await browser.get(f"/console/members/{member['id']}")
    assert "Membership cancelled." in page.text
    assert page.text.count('<td class="actor">' + staff_id) == 3
    # Cancelled: only joining again is offered.
    assert "/membership/join" in page.text
    assert "/membership/cancel" not in page.text


async def test_a_business_error_shows_an_error_page_and_changes_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    plan = await api.create_plan(term_months=12, renewal_window_days=10)
    member = await api.create_member()
    await award(api, member["id"], 40)
    joined = await api.post(
        f"/api/v1/members/{member['id']}/membership/join", {"plan_id": plan["id"]}
    )
    assert joined.status_code == 200
    await create_staff_user(db, role="admin")
    await sign_in(browser)
    before_history = await transactions_of(api, member["id"])
    before_terms = (await api.get(f"/api/v1/members/{member['id']}/membership/terms")).json()

    for action, fields, words in (
        ("redeem", {"points": "41"}, "40 points; 41 are needed"),
        ("membership/renew", {"plan_id": ""}, "renewal window"),
        ("membership/join", {"plan_id": plan["id"]}, "Cannot join"),
    ):
        refused = await post_form(browser, member["id"], action, fields)
        assert refused.status_code in (404, 409), (action, refused.text)
        assert words in refused.text, action
        assert "<h1>" in refused.text
    assert await transactions_of(api, member["id"]) == before_history
    after_terms = (await api.get(f"/api/v1/members/{member['id']}/membership/terms")).json()
    assert after_terms == before_terms


async def test_a_deduction_above_a_support_agents_limit_waits_for_approval(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    limits = {"role_limits": {"support_agent": {"award": 999, "deduct": 100}}}
    assert (await api.patch("/api/v1/program", limits)).status_code == 200
    member = await api.create_member()
    await award(api, member["id"], 500)
    staff_id = await create_staff_user(db, role="support_agent")
    await sign_in(browser)

    held = await post_form(
        browser, member["id"], "deduct", {"points": "150", "reason": "Chargeback"}
    )
    assert held.status_code == 303, held.text
    approvals = (await api.get("/api/v1/approvals")).json()["data"]
    assert [(a["status"], a["points"], a["requested_by"], a["member_id"]) for a in approvals] == [
        ("pending", 150, staff_id, member["id"])
    ]
    assert (await points_of(api, member["id"]))["current_balance"] == 500
    page = await browser.get(f"/console/members/{member['id']}")
    assert "Sent for approval" in page.text
    assert approvals[0]["id"] in page.text
    assert shown_points(page, "balance") == 500

    within = await post_form(browser, member["id"], "deduct", {"points": "100", "reason": "Fix"})
    assert within.status_code == 303
    assert (await points_of(api, member["id"]))["current_balance"] == 400
    asked = await post_form(
        browser,
        member["id"],
        "deduct",
        {"points": "5", "reason": "Check", "require_approval": "true"},
    )
    assert asked.status_code == 303
    assert len((await api.get("/api/v1/approvals")).json()["data"]) == 2
    assert (await points_of(api, member["id"]))["current_balance"] == 400


# ------------------------------------------------------------------ who may do what


ACTIONS: list[tuple[str, dict[str, str]]] = [
    ("award", {"points": "10", "reason": "x"}),
    ("redeem", {"points": "10"}),
    ("deduct", {"points": "10", "reason": "x"}),
    ("extend", {"batch_id": "pbt_none", "expires_on": "2099-01-01", "reason": "x"}),
    ("membership/join", {"plan_id": "pln_none"}),
    ("membership/renew", {}),
    ("membership/cancel", {}),
]


async def test_an_org_bound_staff_user_cannot_see_or_change_another_organisations_member(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    own = await api.create_member(organisation_id=mine, first_name="Shared")
    other = await api.create_member(organisation_id=theirs, first_name="Shared")
    await award(api, other["id"], 500)
    await create_staff_user(db, role="admin", organisation=mine)
    await sign_in(browser)

    listed = await browser.get("/console/members", params={"q": "shared"})
    assert linked_members(listed) == [own["id"]]
    by_email = await browser.get("/console/members", params={"email": other["email"]})
    assert by_email.status_code == 200
    assert linked_members(by_email) == []
    assert other["id"] not in (await browser.get("/console/members")).text
    hidden = await browser.get(f"/console/members/{other['id']}")
    assert hidden.status_code == 404
    token = csrf_of(await browser.get(f"/console/members/{own['id']}"))
    for action, fields in ACTIONS:
        refused = await browser.post(
            f"/console/members/{other['id']}/{action}", data={"csrf_token": token, **fields}
        )
        assert refused.status_code == 404, (action, refused.text)
    assert len(await transactions_of(api, other["id"])) == 1
    assert (await api.get(f"/api/v1/members/{other['id']}")).json()["status"] == "pending"
    assert (await api.get("/api/v1/approvals")).json()["data"] == []


async def test_actions_outside_the_role_are_neither_shown_nor_accepted(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    plan = await api.create_plan()
    member = await api.create_member()
    await award(api, member["id"], 500, expires_at="2099-01-01T00:00:00Z")
    batch = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"][0]
    await create_staff_user(db, role="support_agent")
    await sign_in(browser)
    page = await browser.get(f"/console/members/{member['id']}")
    assert page.status_code == 200
    base = f"/console/members/{member['id']}"
    for hidden in ("/redeem", "/extend", "/membership/join", "/membership/cancel"):
        assert f'action="{base}{hidden}"' not in page.text
    for offered in ("/award", "/deduct"):
        assert f'action="{base}{offered}"' in page.text
    token = csrf_of(page)
    for action, fields in (
        ("redeem", {"points": "10"}),
        ("extend", {"batch_id": batch["id"], "expires_on": "2100-01-01", "reason": "x"}),
        ("membership/join", {"plan_id": plan["id"]}),
        ("membership/renew", {}),
        ("membership/cancel", {}),
    ):
        refused = await browser.post(f"{base}/{action}", data={"csrf_token": token, **fields})
        assert refused.status_code == 403, (action, refused.text)
        assert "lacks the" in refused.text
    # Above the support agent's award limit: refused as the API refuses it.
    over = await browser.post(
        f"{base}/award", data={"csrf_token": token, "points": "1000", "reason": "x"}
    )
    assert over.status_code == 403
    assert len(await transactions_of(api, member["id"])) == 1
    assert (await api.get(f"/api/v1/members/{member['id']}")).json()["status"] == "pending"


async def test_every_action_refuses_a_form_without_its_csrf_token(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 500)
    await create_staff_user(db, role="admin")
    await sign_in(browser)
    for action, fields in ACTIONS:
        for token in (None, "", "forged"):
            data = dict(fields) if token is None else {"csrf_token": token, **fields}
            refused = await browser.post(f"/console/members/{member['id']}/{action}", data=data)
            assert refused.status_code == 403, (action, refused.text)
    assert len(await transactions_of(api, member["id"])) == 1
    assert (await api.get("/api/v1/approvals")).json()["data"] == []


# ------------------------------------------------------------------ bad input


async def test_bad_form_input_is_refused_with_a_clear_page_and_changes_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    other = await api.create_member()
    await award(api, member["id"], 500, expires_at="2099-01-01T00:00:00Z")
    await award(api, other["id"], 500, expires_at="2099-01-01T00:00:00Z")
    (batch,) = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"]
    (other_batch,) = (await api.get(f"/api/v1/members/{other['id']}/points/batches")).json()["data"]
    await create_staff_user(db, role="admin")
    await sign_in(browser)
    token = csrf_of(await browser.get(f"/console/members/{member['id']}"))
    extend = {"batch_id": batch["id"], "expires_on": "2100-01-01", "reason": "x"}
    bad: list[tuple[str, dict[str, str]]] = [
        *[
            (action, {"points": points, "reason": "x"})
            for action in ("award", "redeem", "deduct")
            for points in ("-5", "0", "", "ten", "1.5", "1e3", "9" * 40, str(10**13), "\x00")
        ],
        ("award", {"points": "10", "reason": "   "}),
        ("award", {"points": "10", "reason": "a\x00b"}),
        ("deduct", {"points": "10", "reason": "   "}),
        ("deduct", {"points": "10", "reason": "x" * 1001}),
        ("deduct", {"points": "10", "reason": "x", "require_approval": "perhaps"}),
        ("deduct", {"points": "600", "reason": "more than the balance"}),
        ("redeem", {"points": "10", "reason": "\x00"}),
        *[
            ("extend", {**extend, "expires_on": day})
            for day in ("2025-02-30", "99999-01-01", "9999-12-31", "tomorrow", "", "2000-01-01")
        ],
        ("extend", {**extend, "batch_id": other_batch["id"]}),
        ("extend", {**extend, "batch_id": "pbt_nosuchbatch"}),
        ("extend", {**extend, "batch_id": "../../etc"}),
        ("extend", {**extend, "reason": ""}),
        ("membership/join", {"plan_id": "'; DROP TABLE plans; --"}),
        ("membership/join", {"plan_id": ""}),
        ("membership/join", {"plan_id": "pln_doesnotexist"}),
        ("membership/renew", {"plan_id": "x" * 100}),
        ("membership/cancel", {"at_period_end": "sometimes"}),
        ("membership/cancel", {"note": "\x00"}),
    ]
    for action, fields in bad:
        answered = await browser.post(
            f"/console/members/{member['id']}/{action}", data={"csrf_token": token, **fields}
        )
        assert 400 <= answered.status_code < 500, (action, fields, answered.text[:300])
        assert "<h1>" in answered.text
    for junk in ("MEM_X", "mem_" + "a" * 60, "mem_x%00", "mem_nosuchmember", "x"):
        answered = await browser.post(
            f"/console/members/{junk}/award",
            data={"csrf_token": token, "points": "10", "reason": "x"},
        )
        assert 400 <= answered.status_code < 500, junk
        assert (await browser.get(f"/console/members/{junk}")).status_code in (404, 422)
    assert len(await transactions_of(api, member["id"])) == 1
    assert len(await transactions_of(api, other["id"])) == 1
    assert (await api.get(f"/api/v1/members/{member['id']}")).json()["status"] == "pending"
    assert (await api.get("/api/v1/approvals")).json()["data"] == []
    batches = (await api.get(f"/api/v1/members/{member['id']}/points/batches")).json()["data"]
    assert batches == [batch]


FUZZ = [
    "",
    "\x00",
    "'; DROP TABLE members; --",
    "<script>x</script>",
    "é" * 400,
    "a" * 700,
    "crm:",
    ":1",
    "a:b:c",
    "-1",
    "9" * 40,
    "eyJhZnRlciI6LTF9",  # {"after":-1}
    "eyJhZnRlciI6OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTl9",  # past the largest id
    "W10",  # []
    "%ZZ",
    "active\x00",
]


async def test_no_fuzzed_query_string_makes_the_members_pages_fail(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await create_staff_user(db)
    await sign_in(browser)
    names = ["email", "q", "external_id", "tier", "status", "cursor", "status_cursor"]
    for path in ("/console/members", f"/console/members/{member['id']}"):
        for name in names:
            for value in FUZZ:
                answered = await browser.get(path, params={name: value})
                assert answered.status_code < 500, (path, name, value, answered.text[:300])
        for raw in ("cursor=%FF%FE", "status=a&status=b", "%", "=&=&", "q=%E0%A4%A"):
            answered = await browser.get(f"{path}?{raw}")
            assert answered.status_code < 500, (path, raw)


def test_money_is_shown_in_the_currencys_units() -> None:
    assert format_money(525, "EUR") == "5.25 EUR"
    assert format_money(1234567, "MYR") == "12,345.67 MYR"
    assert format_money(500, "JPY") == "500 JPY"
    assert format_money(1, "KWD") == "0.001 KWD"
    assert format_money(0, "EUR") == "0.00 EUR"


def test_a_new_expiry_date_ends_with_the_day_in_the_programs_time_zone() -> None:
    class Program:
        timezone = "Asia/Kuala_Lumpur"

    ends = members_page._end_of_day("2030-06-01", Program())  # type: ignore[arg-type]
    # Midnight after 1 June in Kuala Lumpur (UTC+8).
    assert ends == datetime(2030, 6, 1, 16, 0, tzinfo=UTC)


async def test_the_award_form_takes_what_the_api_takes(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db, role="admin")
    member = await api.create_member()
    await sign_in(browser)
    page = f"/console/members/{member['id']}"
    form = (await browser.get(page)).text
    assert 'id="award-points" name="points" type="number" min="1" max="1000000000000"' in form
    assert 'id="award-reason" name="reason" type="text" required maxlength="1000"' in form
    reason = "r" * 1000
    awarded = await submit(browser, page, f"{page}/award", {"points": "2000000", "reason": reason})
    assert awarded.status_code == 303, awarded.text
    history = (await api.get("/api/v1/points/transactions", {"member_id": member["id"]})).json()
    assert [(t["points"], t["reason"]) for t in history["data"]] == [(2_000_000, reason)]


async def test_a_refused_action_offers_the_way_back_to_its_page(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db, role="admin")
    member = await api.create_member()
    await sign_in(browser)
    page = f"/console/members/{member['id']}"
    token = csrf_of(await browser.get(page))
    too_many = {"csrf_token": token, "points": "5", "reason": "Voucher"}
    for referer, back in (
        (f"https://testserver{page}", page),
        (f"https://elsewhere.example{page}", None),
        ("https://testserver/api/v1/members", None),
    ):
        refused = await browser.post(f"{page}/redeem", data=too_many, headers={"Referer": referer})
        assert refused.status_code == 409, refused.text
        assert "The member has 0 points; 5 are needed." in refused.text
        shown = f'<a href="{back}">Back to the page</a>'
        assert (shown in refused.text) is (back is not None), referer
        assert '<a href="/console">Back to the console</a>' in refused.text
