"""The console's defences: CSRF, organisation limits, lockout, sign-in limits, fuzzed
query strings, and idle sessions."""

from __future__ import annotations

import random
import re
import time

import httpx
import pyotp
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from memberhub.console.session import COOKIE_NAME, load_session
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.console.support import PASSWORD, create_staff_user, csrf_of, sign_in, submit
from tests.support import ApiClient


async def test_a_form_posted_without_its_csrf_token_is_refused_and_changes_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    member = await api.create_member()
    await sign_in(browser)
    action = f"/console/members/{member['id']}/award"
    for token in (None, "", "forged"):
        fields = {"points": "10", "reason": "x"}
        if token is not None:
            fields["csrf_token"] = token
        refused = await browser.post(action, data=fields)
        assert refused.status_code == 403, refused.text
        assert "<h1>" in refused.text
    assert (await api.get("/api/v1/points/transactions")).json()["data"] == []
    no_token = await browser.post(
        "/console/sign-in", data={"email": "ana@example.org", "password": PASSWORD}
    )
    assert no_token.status_code == 403


async def test_an_org_bound_staff_user_cannot_open_another_organisations_member(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    own_member = await api.create_member(organisation_id=mine, email="own@example.org")
    other_member = await api.create_member(organisation_id=theirs, email="other@example.org")
    await create_staff_user(db, role="manager", organisation=mine)
    await sign_in(browser)
    assert (await browser.get(f"/console/members/{own_member['id']}")).status_code == 200
    hidden = await browser.get(f"/console/members/{other_member['id']}")
    assert hidden.status_code == 404
    assert "does not exist" in hidden.text
    lookup = await browser.get("/console/members", params={"email": "other@example.org"})
    assert other_member["id"] not in lookup.text
    page = await browser.get(f"/console/members/{own_member['id']}")
    refused = await browser.post(
        f"/console/members/{other_member['id']}/award",
        data={"csrf_token": csrf_of(page), "points": "10", "reason": "x"},
    )
    assert refused.status_code == 404
    assert (await api.get("/api/v1/points/transactions")).json()["data"] == []


def _error(page: str) -> str:
    return page.split('class="error"', 1)[1].split("</", 1)[0]


async def test_a_locked_out_account_stays_locked_even_with_the_right_password(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, app: object
) -> None:
    staff_id = await create_staff_user(db)
    lockout = app.state.settings.staff_lockout_attempts  # type: ignore[attr-defined]
    for _ in range(lockout - 1):
        assert (await sign_in(browser, password="wrong password")).status_code == 401
    locked = await sign_in(browser, password="wrong password")
    assert locked.status_code == 401
    for _ in range(2):
        still = await sign_in(browser)
        assert still.status_code == 401
    # Told as an unknown email is: the answer says nothing of which emails have accounts.
    unknown = await sign_in(browser, email="nobody@example.org", password="wrong password")
    assert (unknown.status_code, _error(unknown.text)) == (401, _error(still.text))
    assert "locked for" in _error(still.text)
    assert (await browser.get("/console")).status_code == 303
    shown = (await api.get(f"/api/v1/staff/{staff_id}")).json()
    assert shown["locked_until"] is not None
    unlocked = await api.post(f"/api/v1/staff/{staff_id}/unlock", {})
    assert unlocked.status_code == 200
    assert (await sign_in(browser)).status_code == 303


async def test_the_current_password_cannot_be_guessed_from_a_signed_in_session(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, app: object
) -> None:
    staff_id = await create_staff_user(db)
    await sign_in(browser)
    lockout = app.state.settings.staff_lockout_attempts  # type: ignore[attr-defined]
    guess = {"current_password": "a wrong guess", "new_password": "n" * 16}
    answers = [
        await submit(browser, "/console/account", "/console/account/password", guess)
        for _ in range(lockout)
    ]
    assert [a.status_code for a in answers] == [422] * (lockout - 1) + [303]
    assert answers[-1].headers["location"] == "/console/sign-in"
    assert (await browser.get("/console")).status_code == 303, "signed out"
    assert (await api.get(f"/api/v1/staff/{staff_id}")).json()["locked_until"] is not None
    assert (await sign_in(browser)).status_code == 401, "locked, even with the right password"


async def test_sign_in_attempts_are_limited_per_address(
    browser: httpx.AsyncClient, db: Database, app: object
) -> None:
    app.state.settings.sign_in_rate_limit = "3/minute"  # type: ignore[attr-defined]
    for attempt in range(3):
        answered = await sign_in(browser, email=f"nobody{attempt}@example.org")
        assert answered.status_code == 401
    limited = await sign_in(browser, email="someone@example.org")
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers


async def test_totp_enrolment_then_sign_in_asks_for_a_code(
    browser: httpx.AsyncClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    started = await submit(browser, "/console/account", "/console/account/totp", {})
    assert started.status_code == 200
    secret = started.text.split('id="totp-secret">')[1].split("<")[0]
    wrong = await browser.post(
        "/console/account/totp/confirm", data={"csrf_token": csrf_of(started), "code": "000000"}
    )
    assert wrong.status_code == 422
    # A mistyped code shows the same secret and the form again, to try the next code.
    assert wrong.text.split('id="totp-secret">')[1].split("<")[0] == secret
    assert 'action="/console/account/totp/confirm"' in wrong.text
    confirming_code = pyotp.TOTP(secret).now()
    confirmed = await browser.post(
        "/console/account/totp/confirm",
        data={"csrf_token": csrf_of(wrong), "code": confirming_code},
    )
    assert confirmed.status_code == 303, confirmed.text
    browser.cookies.clear()
    first = await sign_in(browser)
    assert first.headers["location"] == "/console/sign-in/code"
    assert (await browser.get("/console")).status_code == 303
    bad = await submit(browser, "/console/sign-in/code", "/console/sign-in/code", {"code": "1"})
    assert bad.status_code == 401
    # The code that confirmed the enrolment was used: it does not sign in.
    reused = await submit(
        browser, "/console/sign-in/code", "/console/sign-in/code", {"code": confirming_code}
    )
    assert reused.status_code == 401
    next_code = pyotp.TOTP(secret).at(time.time() + 30)
    good = await submit(
        browser, "/console/sign-in/code", "/console/sign-in/code", {"code": next_code}
    )
    assert good.status_code == 303
    assert (await browser.get("/console")).status_code == 200


async def test_a_session_ends_after_the_idle_time(settings: Settings) -> None:
    from memberhub.console.session import ConsoleSession, _serializer

    session = ConsoleSession()
    session.sign_in("stf_x", 1)
    cookie = _serializer(settings).dumps(session.data)
    now = time.time()
    assert load_session(settings, cookie, now).staff_id == "stf_x"
    later = now + settings.console_idle_minutes * 60 + 1
    expired = load_session(settings, cookie, later)
    assert expired.staff_id is None
    assert expired.expired
    assert load_session(settings, cookie + "x", now).staff_id is None
    assert COOKIE_NAME


NASTY = [
    "",
    "\x00",
    "%00",
    "'; DROP TABLE members; --",
    "<script>x</script>",
    "é" * 400,
    "a" * 700,
    "//evil.example",
    "/console/../../etc",
    "\r\nSet-Cookie: x=1",
    "mem_",
    "0",
    "-1",
    "9" * 40,
    "\u202e",
    "{{7*7}}",
    "%ZZ",
    "&&==",
    "a@b",
    "@",
]


def _console_pages(app: FastAPI) -> list[tuple[str, list[str]]]:
    """Every console page answering GET, with made-up ids in its path, and the names of the
    query parameters it reads (and some it does not)."""
    pages = []
    for route in app.routes:
        if not isinstance(route, APIRoute) or "GET" not in (route.methods or ()):
            continue
        if not route.path.startswith("/console") or route.path.startswith("/console/static"):
            continue
        path = re.sub(r"\{[^}]+\}", "xx_1", route.path)
        names = [param.alias for param in route.dependant.query_params]
        pages.append((path, [*names, "next", "q", "cursor", "limit", "x"]))
    return pages


def _fuzzed_queries(app: FastAPI, count: int) -> list[tuple[str, dict[str, str]]]:
    chooser = random.Random(15)
    pages = _console_pages(app)
    cases = []
    for _ in range(count):
        path, names = chooser.choice(pages)
        query = {
            chooser.choice(names): chooser.choice(NASTY)
            + "".join(chr(chooser.randrange(1, 0x2FFF)) for _ in range(chooser.randrange(8)))
            for _ in range(chooser.randrange(1, 4))
        }
        cases.append((path, query))
    return cases


@pytest.mark.parametrize("signed_in", [False, True])
async def test_no_console_page_answers_500_to_a_fuzzed_query_string(
    app: FastAPI, browser: httpx.AsyncClient, db: Database, signed_in: bool
) -> None:
    await create_staff_user(db)
    if signed_in:
        await sign_in(browser)
    pages = _console_pages(app)
    assert len(pages) >= 20, pages
    for path, query in _fuzzed_queries(app, 8 * len(pages)):
        answered = await browser.get(path, params=query)
        assert answered.status_code < 500, (path, query, answered.text[:300])
    for raw in ("email=%FF%FE%00", "next=%2F%2Fevil&next=x", "%", "a=%E0%A4%A", "=&=&"):
        for path, _ in pages:
            answered = await browser.get(f"{path}?{raw}")
            assert answered.status_code < 500, (path, raw, answered.text[:300])
