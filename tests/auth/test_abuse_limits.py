"""Requests without a valid API key are limited per client address."""

from __future__ import annotations

import httpx

from memberhub.app import create_app
from memberhub.kit.db import Database
from memberhub.settings import Settings


def _client(app: object, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_an_address_sending_bad_keys_is_refused_then_for_the_window(
    settings: Settings, db: Database, admin_key: str
) -> None:
    app = create_app(settings.model_copy(update={"unauthenticated_rate_limit": "3/minute"}), db=db)
    bad = {"Authorization": "Bearer mh_not_a_key"}
    good = {"Authorization": f"Bearer {admin_key}"}
    async with _client(app, "203.0.113.7") as attacker, _client(app, "198.51.100.2") as other:
        assert (await attacker.get("/api/v1/members", headers=good)).status_code == 200
        statuses = [(await attacker.get("/api/v1/members", headers=bad)).status_code]
        statuses += [(await attacker.get("/api/v1/members", headers=bad)).status_code]
        statuses += [(await attacker.get("/api/v1/members", headers=bad)).status_code]
        assert statuses == [401, 401, 401]
        refused = await attacker.get("/api/v1/members")  # no key at all counts too
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "RATE_LIMITED"
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        # Until the window ends, even a valid key from that address is refused: a guess that
        # succeeds must look like one that fails.
        assert (await attacker.get("/api/v1/members", headers=good)).status_code == 429
        assert (await other.get("/api/v1/members", headers=bad)).status_code == 401
        assert (await other.get("/api/v1/members", headers=good)).status_code == 200
