"""Failures still answer in the one error shape, with the request id, and never leak data."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support import ApiClient


@pytest.fixture
async def tolerant_http(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client that receives the 500 response instead of the re-raised exception."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def test_an_unexpected_failure_is_a_500_in_the_error_shape_with_the_request_id(
    tolerant_http: httpx.AsyncClient, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("secret-detail-not-for-clients")

    # A step every member create takes, on either database, after its row is written.
    monkeypatch.setattr("memberhub.members.service.record_consent_changes", broken)
    response = await tolerant_http.post(
        "/api/v1/members",
        json={"email": "boom@example.com"},
        headers={"Authorization": f"Bearer {admin_key}", "X-Request-ID": "req-123"},
    )
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "req-123"
    assert response.json() == {
        "error": {
            "code": "INTERNAL_ERROR",
            "message": "An unexpected error occurred.",
            "details": {},
        }
    }
    assert "secret-detail" not in response.text


async def test_an_empty_organisation_reference_is_a_validation_error(api: ApiClient) -> None:
    org = await api.create_organisation()
    member = await api.create_member(organisation_id=org["id"])
    response = await api.patch(f"/api/v1/members/{member['id']}", {"organisation_id": ""})
    assert response.status_code == 422
    fetched = await api.get(f"/api/v1/members/{member['id']}")
    assert fetched.json()["organisation_id"] == org["id"]


async def test_patches_cannot_grow_custom_fields_past_the_limit(api: ApiClient) -> None:
    member = await api.create_member(custom_fields={f"f{i}": i for i in range(40)})
    response = await api.patch(
        f"/api/v1/members/{member['id']}", {"custom_fields": {f"g{i}": i for i in range(20)}}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["limit"] == 50
    fetched = await api.get(f"/api/v1/members/{member['id']}")
    assert len(fetched.json()["custom_fields"]) == 40


async def test_a_phone_longer_than_its_column_is_refused(api: ApiClient) -> None:
    response = await api.post(
        "/api/v1/members", {"email": "p@example.com", "phone": "+" + "1" * 40}
    )
    assert response.status_code == 422
    ok = await api.post("/api/v1/members", {"email": "p@example.com", "phone": "+" + "1" * 39})
    assert ok.status_code == 201, ok.text


async def test_a_long_status_note_is_stored_whole(api: ApiClient) -> None:
    plan = await api.create_plan()
    member = await api.create_member()
    note = "n" * 1000
    joined = await api.post(
        f"/api/v1/members/{member['id']}/membership/join", {"plan_id": plan["id"], "note": note}
    )
    assert joined.status_code == 200, joined.text
    history = await api.get(f"/api/v1/members/{member['id']}/status-history")
    assert history.json()["data"][-1]["note"] == note


async def test_an_organisation_with_plans_cannot_be_deleted(api: ApiClient) -> None:
    org = await api.create_organisation()
    await api.create_plan(organisation_id=org["id"])
    response = await api.delete(f"/api/v1/organisations/{org['id']}")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "ORGANISATION_IN_USE"
    assert {kind: count for kind, count in error["details"].items() if count} == {"plans": 1}
    assert error["details"]["members"] == 0


async def test_erased_members_do_not_keep_an_organisation_alive(api: ApiClient) -> None:
    org = await api.create_organisation()
    member = await api.create_member(organisation_id=org["id"])
    assert (await api.delete(f"/api/v1/members/{member['id']}")).status_code == 204
    assert (await api.delete(f"/api/v1/organisations/{org['id']}")).status_code == 204


async def test_a_client_gone_before_its_body_arrived_is_a_499_not_a_server_error(
    app: Any, db: Any, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []

    class Recorder:
        def __getattr__(self, _level: str) -> Any:
            return lambda event, **_fields: events.append(event)

    monkeypatch.setattr("memberhub.kit.http.log", Recorder())
    sent: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"email": "gone@ex', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/members",
        "raw_path": b"/api/v1/members",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {admin_key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", b"40"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)  # no exception comes out of the app
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 499
    assert "client_disconnected" in events
    assert "unhandled_error" not in events


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
async def test_a_deadlock_or_serialization_failure_is_a_503_to_send_again(
    tolerant_http: httpx.AsyncClient,
    admin_key: str,
    monkeypatch: pytest.MonkeyPatch,
    sqlstate: str,
) -> None:
    """PostgreSQL rolls one transaction back to break a deadlock (40P01) or when it cannot
    serialise it (40001): nothing was written and the request may be sent again."""
    from sqlalchemy.exc import DBAPIError

    class RolledBack(Exception):
        def __init__(self) -> None:
            super().__init__("deadlock detected")
            self.sqlstate = sqlstate

    def conflict(*_args: object, **_kwargs: object) -> None:
        raise DBAPIError("UPDATE point_accounts ...", {}, RolledBack())

    monkeypatch.setattr("memberhub.members.service.record_consent_changes", conflict)
    response = await tolerant_http.post(
        "/api/v1/members",
        json={"email": "again@example.com"},
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "CONCURRENT_UPDATE"
    assert response.headers["Retry-After"] == "1"


async def test_a_database_gone_away_is_a_503_to_retry_not_a_500(
    tolerant_http: httpx.AsyncClient, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*_args: object, **_kwargs: object) -> None:
        raise ConnectionRefusedError(111, "Connect call failed")

    monkeypatch.setattr("memberhub.members.service.record_consent_changes", unreachable)
    response = await tolerant_http.post(
        "/api/v1/members",
        json={"email": "later@example.com"},
        headers={"Authorization": f"Bearer {admin_key}"},
    )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert response.headers["Retry-After"] == "1"
