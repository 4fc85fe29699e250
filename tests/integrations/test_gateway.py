"""The outbound gateway against a real HTTP fake of a flaky third-party API."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from prometheus_client import CollectorRegistry

from memberhub.integrations.gateway import (
    LOGGED_BODY_CHARS,
    VENDOR_POLICIES,
    BreakerState,
    CallRecord,
    CircuitBreaker,
    CircuitOpen,
    Gateway,
    GatewayError,
    GatewayPolicy,
    redact,
    redact_body,
    requested_wait,
)
from tests.fakes.flaky_api import FlakyApi, running_flaky_api

# No client-side rate limit unless a test sets one; small breaker numbers to trip it.
POLICY = GatewayPolicy(
    max_attempts=4,
    backoff_base=0.5,
    backoff_max=4.0,
    breaker_min_calls=4,
    breaker_failure_ratio=0.5,
    breaker_open_seconds=30.0,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSleep:
    """Records the waits asked of it and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
async def api() -> AsyncIterator[FlakyApi]:
    async with running_flaky_api() as flaky_api:
        yield flaky_api


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def gateway(
    api: FlakyApi, sleep: RecordingSleep, clock: FakeClock, registry: CollectorRegistry
) -> AsyncIterator[Gateway]:
    async with Gateway(
        "crm", api.base_url, policy=POLICY, registry=registry, sleep=sleep, clock=clock
    ) as crm:
        yield crm


def _calls(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value(
        "memberhub_gateway_calls_total", {"integration": "crm", "outcome": outcome}
    )
    return value or 0.0


def _breaker_gauge(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("memberhub_gateway_breaker_state", {"integration": "crm"})


# Retries


async def test_retries_503_with_jittered_backoff_then_returns_the_success(
    api: FlakyApi, gateway: Gateway, sleep: RecordingSleep
) -> None:
    api.fail_next(2, status=503)

    response = await gateway.request("GET", "/contacts")

    assert response.status_code == 200
    assert api.count("/contacts") == 3
    assert len(sleep.waits) == 2
    # Full jitter: anywhere from 0 to base * 2^(attempt - 1).
    assert 0 <= sleep.waits[0] <= 0.5
    assert 0 <= sleep.waits[1] <= 1.0


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_client_errors_are_returned_without_retry(
    api: FlakyApi, gateway: Gateway, sleep: RecordingSleep, status: int
) -> None:
    api.fail_next(1, status=status)

    response = await gateway.request("GET", "/contacts")

    assert response.status_code == status
    assert api.count("/contacts") == 1
    assert sleep.waits == []


async def test_gives_up_after_max_attempts_with_the_last_status_and_body(
    api: FlakyApi, gateway: Gateway
) -> None:
    api.set_down(True)

    with pytest.raises(GatewayError) as caught:
        await gateway.request("GET", "/contacts")

    assert caught.value.status == 503
    assert caught.value.attempts == POLICY.max_attempts
    assert '"status": 503' in caught.value.body_excerpt
    assert api.count("/contacts") == POLICY.max_attempts


async def test_retry_after_in_seconds_sets_the_wait(
    api: FlakyApi, gateway: Gateway, sleep: RecordingSleep
) -> None:
    api.fail_next(1, status=429, headers={"Retry-After": "7"})

    response = await gateway.request("GET", "/contacts")

    assert response.status_code == 200
    assert sleep.waits == [7.0]


async def test_vendor_wait_is_bounded_by_max_retry_after(
    api: FlakyApi, gateway: Gateway, sleep: RecordingSleep
) -> None:
    api.fail_next(1, status=503, headers={"Retry-After": "3600"})

    await gateway.request("GET", "/contacts")

    assert sleep.waits == [POLICY.max_retry_after]


async def test_a_longer_wait_goes_to_the_caller_where_the_policy_says_so(
    api: FlakyApi, gateway: Gateway, sleep: RecordingSleep
) -> None:
    gateway.policy = dataclasses.replace(POLICY, longer_waits_to_caller=True)
    api.fail_next(1, status=429, headers={"Retry-After": "3600"})

    with pytest.raises(GatewayError) as caught:
        await gateway.request("GET", "/contacts")

    # Not sent again within the call, an hour early: the caller waits, as asked.
    assert (caught.value.status, caught.value.retry_after) == (429, 3600.0)
    assert sleep.waits == []
    assert api.count("/contacts") == 1


def test_requested_wait_reads_retry_after_dates_and_vendor_reset_headers() -> None:
    in_ten_seconds = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    from_date = requested_wait(httpx.Headers({"Retry-After": in_ten_seconds}))
    assert from_date is not None
    assert 8 <= from_date <= 10
    assert requested_wait(httpx.Headers({"X-RateLimit-Reset": "2"})) == 2.0
    assert requested_wait(httpx.Headers({"RateLimit-Reset": "5"})) == 5.0
    hubspot = httpx.Headers({"X-HubSpot-RateLimit-Interval-Milliseconds": "10000"})
    assert requested_wait(hubspot) == 10.0
    assert requested_wait(httpx.Headers({})) is None


async def test_post_without_idempotency_key_is_not_retried_on_503(
    api: FlakyApi, gateway: Gateway
) -> None:
    api.fail_next(1, status=503)

    with pytest.raises(GatewayError) as caught:
        await gateway.request("POST", "/deals", json={"name": "x"})

    assert caught.value.status == 503
    assert api.count("/deals") == 1


async def test_post_without_idempotency_key_is_retried_on_429(
    api: FlakyApi, gateway: Gateway
) -> None:
    api.fail_next(2, status=429, headers={"Retry-After": "1"})

    response = await gateway.request("POST", "/deals", json={"name": "x"})

    assert response.status_code == 200
    assert api.count("/deals") == 3


async def test_post_with_idempotency_key_is_retried_with_the_same_key(
    api: FlakyApi, gateway: Gateway
) -> None:
    api.fail_next(2, status=502)

    response = await gateway.request("POST", "/deals", json={"name": "x"}, idempotency_key="k-1")

    assert response.status_code == 200
    assert api.idempotency_keys("/deals") == ["k-1", "k-1", "k-1"]


async def test_network_errors_are_retried_then_raise_gateway_error(
    sleep: RecordingSleep, clock: FakeClock
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    async with Gateway(
        "crm", f"http://127.0.0.1:{closed_port}", policy=POLICY, sleep=sleep, clock=clock
    ) as crm:
        with pytest.raises(GatewayError) as caught:
            await crm.request("POST", "/deals", json={})

    assert isinstance(caught.value.error, httpx.ConnectError)
    assert caught.value.status is None
    assert caught.value.attempts == POLICY.max_attempts
    assert len(sleep.waits) == POLICY.max_attempts - 1


async def test_auth_hook_sets_headers_on_every_attempt(
    api: FlakyApi, sleep: RecordingSleep
) -> None:
    async def bearer(request: httpx.Request) -> None:
        request.headers["Authorization"] = "Bearer secret-token"

    api.fail_next(1, status=503)
    async with Gateway("crm", api.base_url, policy=POLICY, auth=bearer, sleep=sleep) as crm:
        await crm.request("GET", "/contacts")

    assert [a.headers["authorization"] for a in api.arrivals()] == ["Bearer secret-token"] * 2


# Circuit breaker


def state_of(breaker: CircuitBreaker) -> BreakerState:
    # A call, not the property, so that mypy does not narrow the state between asserts.
    return breaker.state


async def _trip(gateway: Gateway, api: FlakyApi) -> None:
    """Fail `breaker_min_calls` attempts, all of them, so that the breaker opens."""
    api.set_down(True)
    with pytest.raises(GatewayError):
        await gateway.request("GET", "/contacts")
    assert gateway.breaker.state is BreakerState.OPEN


async def test_breaker_opens_on_failure_ratio_and_fails_fast_while_open(
    api: FlakyApi, gateway: Gateway, registry: CollectorRegistry
) -> None:
    await _trip(gateway, api)
    seen = api.count()

    with pytest.raises(CircuitOpen) as caught:
        await gateway.request("GET", "/contacts")

    assert api.count() == seen
    assert caught.value.integration == "crm"
    assert caught.value.retry_after == pytest.approx(POLICY.breaker_open_seconds)
    assert _breaker_gauge(registry) == 2
    assert _calls(registry, "circuit_open") == 1


async def test_breaker_lets_a_probe_through_after_open_seconds_and_closes_on_success(
    api: FlakyApi, gateway: Gateway, clock: FakeClock, registry: CollectorRegistry
) -> None:
    await _trip(gateway, api)
    api.set_down(False)
    clock.advance(POLICY.breaker_open_seconds)

    response = await gateway.request("GET", "/contacts")

    assert response.status_code == 200
    assert gateway.breaker.state is BreakerState.CLOSED
    assert _breaker_gauge(registry) == 0


async def test_breaker_reopens_when_the_probe_fails(
    api: FlakyApi, gateway: Gateway, clock: FakeClock
) -> None:
    await _trip(gateway, api)
    clock.advance(POLICY.breaker_open_seconds)
    seen = api.count()

    # The probe fails, the breaker reopens and stops the retry.
    with pytest.raises(CircuitOpen):
        await gateway.request("GET", "/contacts")

    assert api.count() == seen + 1
    assert gateway.breaker.state is BreakerState.OPEN


def test_half_open_breaker_lets_one_probe_at_a_time(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        window=60, min_calls=2, failure_ratio=0.5, open_seconds=10, clock=clock
    )
    breaker.record_failure()
    breaker.record_failure()
    assert not breaker.allow()

    clock.advance(10)
    assert breaker.allow()
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()

    breaker.record_inconclusive()  # e.g. the probe got a 429
    assert breaker.allow()
    breaker.record_success()
    assert state_of(breaker) is BreakerState.CLOSED


def test_breaker_forgets_outcomes_older_than_its_window(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        window=60, min_calls=4, failure_ratio=0.5, open_seconds=10, clock=clock
    )
    for _ in range(3):
        breaker.record_failure()
    clock.advance(61)
    breaker.record_failure()
    assert state_of(breaker) is BreakerState.CLOSED

    for _ in range(3):
        breaker.record_success()
    breaker.record_failure()  # 2 failures out of 5 in the window: below 0.5
    assert state_of(breaker) is BreakerState.CLOSED
    breaker.record_failure()
    assert state_of(breaker) is BreakerState.OPEN


async def test_429_does_not_count_as_a_breaker_failure(api: FlakyApi, gateway: Gateway) -> None:
    api.fail_next(3, status=429, headers={"Retry-After": "0"})
    await gateway.request("GET", "/contacts")
    api.fail_next(3, status=429, headers={"Retry-After": "0"})
    await gateway.request("GET", "/contacts")

    assert gateway.breaker.state is BreakerState.CLOSED


# Metrics


async def test_metrics_count_calls_attempts_and_latency(
    api: FlakyApi, gateway: Gateway, registry: CollectorRegistry
) -> None:
    api.fail_next(1, status=503)
    await gateway.request("GET", "/contacts")
    api.fail_next(1, status=404)
    await gateway.request("GET", "/contacts/1")

    assert _calls(registry, "ok") == 1
    assert _calls(registry, "client_error") == 1
    labels = {"integration": "crm"}
    for result, expected in (("5xx", 1), ("2xx", 1), ("4xx", 1)):
        attempts = registry.get_sample_value(
            "memberhub_gateway_attempts_total", {**labels, "result": result}
        )
        assert attempts == expected
    durations = registry.get_sample_value(
        "memberhub_gateway_attempt_duration_seconds_count", labels
    )
    assert durations == 3
    assert _breaker_gauge(registry) == 0


async def test_gateways_can_share_a_registry(api: FlakyApi, registry: CollectorRegistry) -> None:
    async with (
        Gateway("crm", api.base_url, policy=POLICY, registry=registry) as crm,
        Gateway("payments", api.base_url, policy=POLICY, registry=registry) as payments,
    ):
        await crm.request("GET", "/a")
        await payments.request("GET", "/b")

    payments_ok = {"integration": "payments", "outcome": "ok"}
    assert registry.get_sample_value("memberhub_gateway_calls_total", payments_ok) == 1
    assert _calls(registry, "ok") == 1


# Rate limiting


# Two and a half seconds' worth at the vendor's rate: several windows.
CALLS = 500


async def test_calls_over_several_windows_of_the_vendor_rate_all_complete(api: FlakyApi) -> None:
    api.set_rate_limit(200, per_seconds=1.0)
    # Our pacing and the vendor's window start at different instants, so a few calls meet
    # a 429 and wait as told; on a loaded machine a call may meet several in a row.
    # On an overloaded machine the in-process server may also drop a connection attempt;
    # the breaker, whose own tests are above, stays out of this test of pacing.
    policy = GatewayPolicy(
        rate_limit="200 per second", max_attempts=10, breaker_min_calls=1_000_000
    )

    async with Gateway("crm", api.base_url, policy=policy) as crm:
        responses = await asyncio.gather(
            *(crm.request("GET", f"/contacts/{n % 10}") for n in range(CALLS))
        )

    assert [r.status_code for r in responses] == [200] * CALLS
    refused = api.count(status=429)
    assert api.count(status=200) == CALLS
    assert api.count() == CALLS + refused


def test_vendor_policies_carry_published_rate_limits() -> None:
    assert VENDOR_POLICIES["hubspot"].rate_limit == "100/10 seconds"
    assert VENDOR_POLICIES["stripe"].rate_limit == "100 per second"
    assert {"salesforce", "pipedrive", "default"} <= VENDOR_POLICIES.keys()
    xero = VENDOR_POLICIES["xero"]
    assert (xero.rate_limit, xero.also_limited_to, xero.max_concurrent) == (
        "60 per minute",
        ("5000 per day",),
        5,
    )


async def test_at_most_max_concurrent_calls_are_in_flight() -> None:
    in_flight = 0
    most = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, json={})

    policy = GatewayPolicy(rate_limit=None, max_concurrent=5)
    async with Gateway(
        "xero", "http://vendor.test", policy=policy, transport=httpx.MockTransport(slow)
    ) as gateway:
        answers = await asyncio.gather(*(gateway.request("GET", "/x") for _ in range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert most == 5


async def test_every_window_of_the_policy_is_kept() -> None:
    """A daily allowance beside the per-minute limit: the call waits for both."""
    sent = 0

    async def count(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return httpx.Response(200, json={})

    policy = GatewayPolicy(rate_limit="100 per minute", also_limited_to=("3 per day",))
    async with Gateway(
        "xero", "http://vendor.test", policy=policy, transport=httpx.MockTransport(count)
    ) as gateway:
        for _ in range(3):
            await gateway.request("GET", "/x")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await gateway.request("GET", "/x")
    assert sent == 3


# Redaction


def test_redact_masks_secret_headers_but_their_last_four_characters() -> None:
    headers = {
        "Authorization": "Bearer abcdefghijkl1234",
        "Cookie": "session=s3cr3tvalue9876",
        "X-Api-Key": "short",
        "Stripe-Signature": "t=1,v1=deadbeefcafe",
        "Content-Type": "application/json",
    }

    assert redact(headers) == {
        "Authorization": "***1234",
        "Cookie": "***9876",
        "X-Api-Key": "***",
        "Stripe-Signature": "***cafe",
        "Content-Type": "application/json",
    }


def test_redact_masks_the_signatures_of_twilio_and_sendgrid_callbacks() -> None:
    headers = {
        "X-Twilio-Signature": "0123456789abcdefXYZ=",
        "X-Twilio-Email-Event-Webhook-Signature": "MEUCIQDabcdefghij==",
        "X-Twilio-Email-Event-Webhook-Timestamp": "1767000000",
    }

    assert redact(headers) == {
        "X-Twilio-Signature": "***XYZ=",
        "X-Twilio-Email-Event-Webhook-Signature": "***ij==",
        "X-Twilio-Email-Event-Webhook-Timestamp": "1767000000",
    }


def test_redact_masks_any_header_named_as_a_signature_and_those_it_is_told_of() -> None:
    headers = {
        "X-Shopify-Hmac-Sha256": "0123456789abcdefXYZ=",
        "X-Hub-Signature-256": "sha256=94fa0123456789651a",
        "X-Acme-Digest": "c2lnbmF0dXJlLXZhbHVl",
        "X-Acme-Timestamp": "1767000000",
    }

    assert redact(headers, also=["x-acme-digest"]) == {
        "X-Shopify-Hmac-Sha256": "***XYZ=",
        "X-Hub-Signature-256": "***651a",
        "X-Acme-Digest": "***bHVl",
        "X-Acme-Timestamp": "1767000000",
    }


async def test_an_answer_larger_than_the_policy_reads_fails_unread_and_is_not_retried() -> None:
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        while True:
            produced += 1
            yield b"x" * 1024

    transport = httpx.MockTransport(lambda _request: httpx.Response(200, content=endless()))
    policy = GatewayPolicy(rate_limit=None, max_response_bytes=64 * 1024)
    async with Gateway("crm", "https://api.example.com", policy=policy, transport=transport) as gw:
        with pytest.raises(GatewayError, match="larger than 65536 bytes") as failed:
            await gw.request("GET", "/contacts")

    assert failed.value.attempts == 1
    assert produced <= 65  # read up to the limit, no further


async def test_the_timeout_bounds_the_whole_answer_not_each_read() -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
        try:
            for _ in range(50):  # a byte every 0.1 s: each read well within the timeout
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    policy = GatewayPolicy(rate_limit=None, timeout=0.5, max_attempts=1)
    try:
        async with Gateway("crm", f"http://127.0.0.1:{port}", policy=policy) as gateway:
            with pytest.raises(GatewayError, match=r"no whole answer within 0\.5 s"):
                await gateway.request("GET", "/")
    finally:
        server.close()


async def test_a_secret_where_the_logged_body_is_cut_is_masked_not_kept_in_part() -> None:
    token = "SECRETTOKEN" * 20
    padding = "p" * (LOGGED_BODY_CHARS - 150)  # the token straddles the cut
    body = json.dumps({"padding": padding, "access_token": token})
    records: list[CallRecord] = []
    transport = httpx.MockTransport(
        lambda _request: httpx.Response(
            200, content=body.encode(), headers={"content-type": "application/json"}
        )
    )
    policy = GatewayPolicy(rate_limit=None, max_attempts=1)
    async with Gateway(
        "crm",
        "https://api.example.com",
        policy=policy,
        transport=transport,
        observer=records.append,
    ) as gateway:
        await gateway.request(
            "POST", "/oauth/token", json={"padding": padding, "client_secret": token}
        )

    [record] = records
    for logged in (record.request_body, record.response_body):
        assert len(logged) <= LOGGED_BODY_CHARS
        assert "SECRETTOKEN" not in logged
        assert logged.startswith('{"padding":')


def test_redact_body_masks_a_jwt_bearer_assertion() -> None:
    grant = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
    form = f"{grant}&assertion=eyJhbGc.eyJpc3M.c2lnbmF0dXJl"

    assert redact_body(form) == f"{grant}&assertion=***dXJl"
