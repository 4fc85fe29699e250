"""`Gateway.exchange`: a non-HTTP exchange (an SMTP session) under the gateway's breaker,
retries, metrics and payload log."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from memberhub.integrations.gateway import (
    CallRecord,
    CircuitOpen,
    ExchangeNotSent,
    ExchangeRefused,
    Gateway,
    GatewayError,
    GatewayPolicy,
)

POLICY = GatewayPolicy(
    max_attempts=3, breaker_min_calls=4, breaker_failure_ratio=0.5, rate_limit=None
)


class Recorder:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def gateway(recorder: Recorder) -> Gateway:
    return Gateway(
        "smtp-test",
        "",
        policy=POLICY,
        observer=recorder.records.append,
        sleep=recorder.sleep,
        registry=CollectorRegistry(),
    )


async def test_a_successful_exchange_is_logged_with_its_method_and_target() -> None:
    recorder = Recorder()

    async def operation() -> str:
        return "250 OK"

    result = await gateway(recorder).exchange(
        "SMTP", "smtp://relay:587", operation, request_headers={"To": "a@b.co"}
    )

    assert result == "250 OK"
    (record,) = recorder.records
    assert (record.method, record.url, record.outcome, record.attempts) == (
        "SMTP",
        "smtp://relay:587",
        "ok",
        1,
    )
    assert record.request_headers == {"To": "a@b.co"}


async def test_nothing_sent_is_retried_with_backoff_then_fails_as_a_gateway_error() -> None:
    recorder = Recorder()
    calls = 0

    async def operation() -> None:
        nonlocal calls
        calls += 1
        raise ExchangeNotSent("connection refused")

    with pytest.raises(GatewayError) as raised:
        await gateway(recorder).exchange("SMTP", "smtp://relay:587", operation)

    assert calls == 3
    assert len(recorder.sleeps) == 2
    assert raised.value.attempts == 3
    assert recorder.records[0].outcome == "failed"


async def test_a_refusal_is_a_client_error_and_is_not_retried() -> None:
    recorder = Recorder()
    calls = 0

    async def operation() -> None:
        nonlocal calls
        calls += 1
        raise ExchangeRefused("550 no such mailbox", status=550)

    with pytest.raises(ExchangeRefused):
        await gateway(recorder).exchange("SMTP", "smtp://relay:587", operation)

    assert calls == 1
    (record,) = recorder.records
    assert (record.outcome, record.status) == ("client_error", 550)


async def test_a_failure_after_sending_began_is_not_retried() -> None:
    recorder = Recorder()
    calls = 0

    async def operation() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("451 try later")

    with pytest.raises(GatewayError):
        await gateway(recorder).exchange("SMTP", "smtp://relay:587", operation)
    assert calls == 1


async def test_failures_open_the_breaker_and_then_nothing_is_attempted() -> None:
    recorder = Recorder()
    client = gateway(recorder)
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("connection reset")

    for _ in range(4):
        with pytest.raises(GatewayError):
            await client.exchange("SMTP", "smtp://relay:587", failing)
    with pytest.raises(CircuitOpen):
        await client.exchange("SMTP", "smtp://relay:587", failing)
    assert calls == 4
    assert recorder.records[-1].outcome == "circuit_open"
