"""The approvals pages: the queue of held deductions, approving and rejecting from the
console with the API's rules (the requester never decides their own request, the role
must allow deciding, organisation limits), CSRF, and bad input."""

from __future__ import annotations

from typing import Any

import httpx

from memberhub.approvals import service as approvals
from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from memberhub.members.service import get_member
from memberhub.points.schemas import DeductRequest
from memberhub.staff import service as staff_service
from memberhub.staff.repository import StaffRepository
from tests.conftest import issue_key
from tests.console.support import create_staff_user, csrf_of, sign_in, submit
from tests.support import ApiClient

QUEUE = "/console/approvals"


async def award(api: ApiClient, member_id: str, points: int) -> None:
    response = await api.post(
        "/api/v1/points/award", {"member_id": member_id, "points": points, "reason": "Bonus"}
    )
    assert response.status_code == 201, response.text


async def held_deduction(
    api: ApiClient, db: Database, member_id: str, points: int, reason: str = "Duplicate award"
) -> dict[str, Any]:
    """A deduction sent over the API by a support agent's key: above the role's limit
    (0 by default), it waits for approval."""
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    response = await agent.post(
        "/api/v1/points/deduct", {"member_id": member_id, "points": points, "reason": reason}
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


async def requested_by_staff(db: Database, staff_id: str, member_id: str, points: int) -> str:
    """A deduction held for approval at the request of a staff user (as the member page's
    form would make it), through the approvals service."""
    async with db.transaction() as session:
        staff = await StaffRepository(session).get_by_public_id(staff_id)
        assert staff is not None
        principal = await staff_service.principal_for(session, staff)
        member = await get_member(session, principal, member_id)
        payload = DeductRequest.model_validate(
            {"member_id": member_id, "points": points, "reason": "Asked by staff"}
            | {"require_approval": True}
        )
        approval = await approvals.request_deduction(session, principal, member, payload)
        return approval.public_id


async def transactions(api: ApiClient, member_id: str) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/points/transactions", {"member_id": member_id})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def approval_of(api: ApiClient, approval_id: str) -> dict[str, Any]:
    response = await api.get(f"/api/v1/approvals/{approval_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_a_held_deduction_shows_in_the_queue_and_a_manager_approves_it(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    held = await held_deduction(api, db, member["id"], 300, reason="Duplicate award on 3 May")
    manager_id = await create_staff_user(db, "mia@example.org", role="manager")
    await sign_in(browser, "mia@example.org")

    queue = await browser.get(QUEUE)
    assert queue.status_code == 200
    row = queue.text.split(f'data-id="{held["id"]}"')[1].split("</tr>")[0]
    assert member["id"] in row
    assert ">300<" in row
    assert "Duplicate award on 3 May" in row
    assert held["requested_by"] in row
    assert "support_agent" in row

    detail_url = f"{QUEUE}/{held['id']}"
    approved = await submit(
        browser, detail_url, f"{detail_url}/approve", {"note": "Checked the receipt"}
    )
    assert approved.status_code == 303, approved.text
    assert approved.headers["location"] == detail_url
    shown = await browser.get(detail_url)
    assert "Approved" in shown.text
    assert 'id="member-balance">700 points<' in shown.text
    assert "300 points deducted" in shown.text

    decided = await approval_of(api, held["id"])
    assert decided["status"] == "approved"
    assert decided["decided_by"] == manager_id
    assert decided["decision_note"] == "Checked the receipt"
    (deduct, _award) = await transactions(api, member["id"])
    assert (deduct["type"], deduct["points"], deduct["actor"]) == ("deduct", -300, manager_id)
    assert deduct["id"] == decided["transaction_id"]
    assert deduct["balance_after"] == 700
    assert held["id"] not in (await browser.get(QUEUE)).text
    assert held["id"] in (await browser.get(QUEUE, params={"status": "approved"})).text


async def test_the_requester_cannot_approve_or_reject_their_own_request(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    manager_id = await create_staff_user(db, "mia@example.org", role="manager")
    approval_id = await requested_by_staff(db, manager_id, member["id"], 200)
    await sign_in(browser, "mia@example.org")

    detail_url = f"{QUEUE}/{approval_id}"
    page = await browser.get(detail_url)
    assert "You requested this" in page.text
    assert f"{detail_url}/approve" not in page.text
    for decision in ("approve", "reject"):
        refused = await browser.post(
            f"{detail_url}/{decision}", data={"csrf_token": csrf_of(page), "note": "mine"}
        )
        assert refused.status_code == 403
        assert "must be decided by someone other than its requester" in refused.text
        assert 'role="alert"' in refused.text

    assert (await approval_of(api, approval_id))["status"] == "pending"
    assert [t["type"] for t in await transactions(api, member["id"])] == ["award"]


async def test_a_rejection_applies_nothing_and_a_second_decision_is_refused(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    held = await held_deduction(api, db, member["id"], 400)
    admin_id = await create_staff_user(db)
    await sign_in(browser)

    detail_url = f"{QUEUE}/{held['id']}"
    rejected = await submit(
        browser, detail_url, f"{detail_url}/reject", {"note": "No duplicate found"}
    )
    assert rejected.status_code == 303, rejected.text
    decided = await approval_of(api, held["id"])
    assert (decided["status"], decided["decided_by"], decided["decision_note"]) == (
        "rejected",
        admin_id,
        "No duplicate found",
    )
    assert decided["transaction_id"] is None

    again = await submit(browser, detail_url, f"{detail_url}/approve", {})
    assert again.status_code == 409
    assert "already rejected" in again.text
    assert (await approval_of(api, held["id"]))["status"] == "rejected"
    assert [t["type"] for t in await transactions(api, member["id"])] == ["award"]


async def test_an_approval_the_balance_no_longer_covers_stays_pending(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 100)
    held = await held_deduction(api, db, member["id"], 300)
    await create_staff_user(db, "mia@example.org", role="manager")
    await sign_in(browser, "mia@example.org")

    detail_url = f"{QUEUE}/{held['id']}"
    refused = await submit(browser, detail_url, f"{detail_url}/approve", {})
    assert refused.status_code == 409
    assert "The member has 100 points; 300 are needed." in refused.text
    assert 'id="member-balance">100 points<' in refused.text
    assert (await approval_of(api, held["id"]))["status"] == "pending"
    assert [t["type"] for t in await transactions(api, member["id"])] == ["award"]


async def test_a_support_agent_cannot_see_or_decide_approvals(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    held = await held_deduction(api, db, member["id"], 300)
    await create_staff_user(db, "sam@example.org", role="support_agent")
    await sign_in(browser, "sam@example.org")

    home = await browser.get("/console")
    assert 'href="/console/approvals"' not in home.text
    assert (await browser.get(QUEUE)).status_code == 403
    assert (await browser.get(f"{QUEUE}/{held['id']}")).status_code == 403
    refused = await browser.post(
        f"{QUEUE}/{held['id']}/approve", data={"csrf_token": csrf_of(home)}
    )
    assert refused.status_code == 403
    assert "approvals:decide" in refused.text
    assert (await approval_of(api, held["id"]))["status"] == "pending"


async def test_an_org_bound_manager_sees_and_decides_only_their_organisations_requests(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    own_member = await api.create_member(organisation_id=mine)
    other_member = await api.create_member(organisation_id=theirs)
    for member in (own_member, other_member):
        await award(api, member["id"], 1000)
    own = await held_deduction(api, db, own_member["id"], 100)
    other = await held_deduction(api, db, other_member["id"], 100)
    await create_staff_user(db, "mia@example.org", role="manager", organisation=mine)
    await sign_in(browser, "mia@example.org")

    queue = await browser.get(QUEUE, params={"status": "all"})
    assert own["id"] in queue.text
    assert other["id"] not in queue.text
    hidden = await browser.get(f"{QUEUE}/{other['id']}")
    assert hidden.status_code == 404
    assert "does not exist" in hidden.text
    refused = await browser.post(
        f"{QUEUE}/{other['id']}/approve", data={"csrf_token": csrf_of(queue)}
    )
    assert refused.status_code == 404
    assert (await approval_of(api, other["id"]))["status"] == "pending"


async def test_decisions_without_the_csrf_token_are_refused(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    held = await held_deduction(api, db, member["id"], 300)
    await create_staff_user(db)
    await sign_in(browser)
    for decision in ("approve", "reject"):
        for token in (None, "", "forged"):
            fields = {"note": "x"} if token is None else {"note": "x", "csrf_token": token}
            refused = await browser.post(f"{QUEUE}/{held['id']}/{decision}", data=fields)
            assert refused.status_code == 403
            assert "<h1>" in refused.text
    assert (await approval_of(api, held["id"]))["status"] == "pending"


async def test_bad_input_gets_a_clear_error_and_changes_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    await award(api, member["id"], 1000)
    held = await held_deduction(api, db, member["id"], 300)
    await create_staff_user(db)
    await sign_in(browser)
    page = await browser.get(QUEUE)
    token = csrf_of(page)

    too_long = await browser.post(
        f"{QUEUE}/{held['id']}/approve", data={"csrf_token": token, "note": "x" * 1001}
    )
    assert too_long.status_code == 422
    assert "note: String should have at most 1000 characters" in too_long.text
    nul = await browser.post(
        f"{QUEUE}/{held['id']}/reject", data={"csrf_token": token, "note": "a\x00b"}
    )
    assert nul.status_code == 422
    for status in ("bogus", "PENDING", "pending'--"):
        assert (await browser.get(QUEUE, params={"status": status})).status_code == 422
    assert (await browser.get(QUEUE, params={"cursor": "not a cursor"})).status_code == 422
    assert (await browser.get(f"{QUEUE}/apr_doesnotexist")).status_code == 404
    assert (await browser.get(f"{QUEUE}/APR..x")).status_code in (404, 422)
    missing = await browser.post(f"{QUEUE}/apr_doesnotexist/approve", data={"csrf_token": token})
    assert missing.status_code == 404
    assert (await approval_of(api, held["id"]))["status"] == "pending"
