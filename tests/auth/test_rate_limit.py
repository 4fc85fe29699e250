"""Per-key rate limits: 429 with Retry-After and RateLimit-* headers, per key, and shared
across API nodes through Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from pathlib import Path

import httpx
import pytest

from memberhub.app import create_app
from memberhub.auth.ratelimit import RateLimiter
from memberhub.auth.roles import Role
from memberhub.kit.db import Database
from memberhub.kit.errors import RateLimited
from memberhub.settings import Settings
from tests.conftest import issue_key
from tests.support import ApiClient

REDIS_URL = os.environ.get("MEMBERHUB_REDIS_URL", "redis://127.0.0.1:6379")


def assert_quota_headers(response: httpx.Response, *, limit: int, remaining: int) -> None:
    assert response.headers["RateLimit-Limit"] == str(limit)
    assert response.headers["RateLimit-Remaining"] == str(remaining)
    reset = int(response.headers["RateLimit-Reset"])
    assert 1 <= reset <= 60


async def test_successful_requests_carry_ratelimit_headers(db: Database, api: ApiClient) -> None:
    client = api.with_key(await issue_key(db, Role.ADMIN, rate_limit="3/minute"))

    for remaining in (2, 1, 0):
        response = await client.get("/api/v1/members")
        assert response.status_code == 200, response.text
        assert_quota_headers(response, limit=3, remaining=remaining)


async def test_key_over_its_limit_gets_429_with_retry_after(db: Database, api: ApiClient) -> None:
    client = api.with_key(await issue_key(db, Role.ADMIN, rate_limit="3/minute"))
    for _ in range(3):
        assert (await client.get("/api/v1/members")).status_code == 200

    response = await client.get("/api/v1/members")

    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "RATE_LIMITED"
    assert error["message"]
    assert isinstance(error["details"], dict)
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert error["retry_after"] == retry_after
    assert_quota_headers(response, limit=3, remaining=0)
    assert response.headers["RateLimit-Reset"] == response.headers["Retry-After"]


async def test_rate_limited_write_changes_nothing(db: Database, api: ApiClient) -> None:
    client = api.with_key(await issue_key(db, Role.ADMIN, rate_limit="2/minute"))
    for n in range(2):
        created = await client.post("/api/v1/members", {"email": f"ok{n}@example.com"})
        assert created.status_code == 201, created.text

    refused = await client.post("/api/v1/members", {"email": "refused@example.com"})

    assert refused.status_code == 429
    emails = {m["email"] for m in (await api.get("/api/v1/members")).json()["data"]}
    assert emails == {"ok0@example.com", "ok1@example.com"}


async def test_another_key_is_unaffected_by_a_limited_key(db: Database, api: ApiClient) -> None:
    limited = api.with_key(await issue_key(db, Role.ADMIN, rate_limit="3/minute"))
    neighbour = api.with_key(await issue_key(db, Role.ADMIN, rate_limit="3/minute"))
    for _ in range(3):
        await limited.get("/api/v1/members")
    assert (await limited.get("/api/v1/members")).status_code == 429

    response = await neighbour.get("/api/v1/members")
    assert response.status_code == 200
    assert_quota_headers(response, limit=3, remaining=2)
    # The installation default (10000/minute in the test settings) applies to other keys.
    default = await api.get("/api/v1/members")
    assert default.status_code == 200
    assert default.headers["RateLimit-Limit"] == "10000"


async def test_unauthenticated_requests_do_not_use_a_keys_quota(
    db: Database, api: ApiClient, http: httpx.AsyncClient
) -> None:
    client = api.with_key(await issue_key(db, Role.ADMIN, rate_limit="3/minute"))
    for _ in range(5):
        await http.get("/api/v1/members", headers={"Authorization": "Bearer mh_wrong"})
    response = await client.get("/api/v1/members")
    assert response.status_code == 200
    assert_quota_headers(response, limit=3, remaining=2)


# --- shared limits through Redis ------------------------------------------------------


@pytest.fixture
async def redis_available() -> None:
    """Redis must be up when MEMBERHUB_REDIS_URL is set; otherwise a missing Redis skips."""
    try:
        reachable = await asyncio.wait_for(RateLimiter("1/second", REDIS_URL).storage.check(), 5)
    except (OSError, TimeoutError):
        reachable = False
    if reachable:
        return
    if "MEMBERHUB_REDIS_URL" in os.environ:
        raise RuntimeError(f"Redis at {REDIS_URL} (MEMBERHUB_REDIS_URL) is unreachable")
    pytest.skip(f"no Redis at {REDIS_URL}; set MEMBERHUB_REDIS_URL to require it")


@pytest.mark.usefixtures("redis_available")
async def test_redis_limit_is_shared_between_two_limiter_instances() -> None:
    node_a = RateLimiter("1000/minute", REDIS_URL)
    node_b = RateLimiter("1000/minute", REDIS_URL)
    key_id = f"key_test{uuid.uuid4().hex}"

    first = await node_a.hit(key_id, "3/minute")
    second = await node_b.hit(key_id, "3/minute")
    third = await node_a.hit(key_id, "3/minute")

    # A None quota would mean the store failed open; the count must really be shared.
    assert first is not None
    assert second is not None
    assert third is not None
    assert [first.remaining, second.remaining, third.remaining] == [2, 1, 0]
    with pytest.raises(RateLimited) as refused:
        await node_b.hit(key_id, "3/minute")
    assert refused.value.retry_after is not None
    assert 1 <= refused.value.retry_after <= 60
    assert refused.value.headers["RateLimit-Remaining"] == "0"

    # Another key's counter on the same store is untouched.
    other = await node_b.hit(f"key_test{uuid.uuid4().hex}", "3/minute")
    assert other is not None
    assert other.remaining == 2


@pytest.mark.usefixtures("redis_available")
async def test_two_api_nodes_sharing_redis_enforce_one_limit(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    secret = await issue_key(db, Role.ADMIN, rate_limit="3/minute")
    nodes = [
        create_app(
            Settings(
                database_url=database_url,
                data_dir=tmp_path / "data",
                secret_key="test-secret-key-not-for-production",
                env="test",
                log_level="WARNING",
                redis_url=REDIS_URL,
            )
        )
        for _ in range(2)
    ]
    headers = {"Authorization": f"Bearer {secret}"}
    try:
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=nodes[0]), base_url="http://node-a"
            ) as node_a,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=nodes[1]), base_url="http://node-b"
            ) as node_b,
        ):
            statuses = [
                (await client.get("/api/v1/members", headers=headers)).status_code
                for client in (node_a, node_b, node_a, node_b)
            ]
    finally:
        for node in nodes:
            await node.state.db.dispose()

    assert statuses == [200, 200, 200, 429]


async def test_a_shared_store_gone_down_leaves_the_limits_counted_per_process() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    limiter = RateLimiter("3/minute", f"redis://127.0.0.1:{port}")
    quotas = [await limiter.hit("key_a") for _ in range(3)]
    assert [quota.remaining for quota in quotas if quota is not None] == [2, 1, 0]
    with pytest.raises(RateLimited):
        await limiter.hit("key_a")
    assert await limiter.hit("key_b") is not None, "each key keeps its own count"
