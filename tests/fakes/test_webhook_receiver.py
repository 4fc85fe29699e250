"""The webhook receiver records, verifies and answers as programmed."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from standardwebhooks import Webhook

from tests.fakes.webhook_receiver import (
    Reply,
    WebhookReceiver,
    always,
    fail_ids,
    fail_times,
    hang,
    retry_after,
    running_receiver,
)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def signed_headers(webhook_id: str, body: str, *secrets: str) -> dict[str, str]:
    now = datetime.now(UTC)
    signatures = [Webhook(secret).sign(webhook_id, now, body) for secret in secrets]
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(signatures),
    }


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[WebhookReceiver]:
    # One server for the module, as starting and stopping one costs ~0.2 s; each test
    # keeps to endpoint names of its own, as end-to-end tests sharing a receiver would.
    async with running_receiver() as running:
        yield running


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """An endpoint name no other test in the module uses."""
    return request.node.name


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as http:
        yield http


async def test_signed_request_is_recorded_and_verified(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    secret = new_secret()
    receiver.set_secrets(name, secret)
    body = json.dumps({"type": "member.created", "data": {"id": "mem_1"}})

    response = await client.post(
        receiver.url(name), content=body, headers=signed_headers("msg_1", body, secret)
    )

    assert (response.status_code, response.text) == (200, "ok")
    [request] = receiver.received(name)
    assert request.path_name == name
    assert request.webhook_id == "msg_1"
    assert request.payload == {"type": "member.created", "data": {"id": "mem_1"}}
    assert request.body == body.encode()
    assert request.headers["content-type"] == "application/json"
    assert request.signature.startswith("v1,")
    assert (request.verified, request.verified_with, request.status) == (True, (0,), 200)
    assert receiver.ids(name) == receiver.successful_ids(name) == ["msg_1"]


async def test_tampered_body_is_not_verified(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    secret = new_secret()
    receiver.set_secrets(name, secret)
    headers = signed_headers("msg_1", '{"points": 10}', secret)

    await client.post(receiver.url(name), content='{"points": 1000}', headers=headers)

    [request] = receiver.received(name)
    assert (request.verified, request.verified_with) == (False, ())
    assert request.payload == {"points": 1000}


async def test_verification_is_not_attempted_without_secrets(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    await client.post(receiver.url(name), content="not json")

    [request] = receiver.received(name)
    assert (request.verified, request.payload, request.webhook_id) == (None, None, "")


async def test_verified_with_lists_every_secret_that_signed(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    old, new = new_secret(), new_secret()
    receiver.set_secrets(name, old, new)
    body = "{}"

    await client.post(receiver.url(name), content=body, headers=signed_headers("a", body, old))
    await client.post(receiver.url(name), content=body, headers=signed_headers("b", body, old, new))
    await client.post(receiver.url(name), content=body, headers=signed_headers("c", body, new))

    assert [(r.webhook_id, r.verified_with) for r in receiver.received(name)] == [
        ("a", (0,)),
        ("b", (0, 1)),
        ("c", (1,)),
    ]


async def test_fail_times_fails_each_webhook_id_then_succeeds(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    receiver.set_handler(name, fail_times(2))

    statuses = [
        (await client.post(receiver.url(name), headers={"webhook-id": webhook_id})).status_code
        for webhook_id in ["a", "a", "b", "a", "b", "b"]
    ]

    assert statuses == [500, 500, 500, 200, 500, 200]
    assert [r.status for r in receiver.received(name)] == statuses
    assert receiver.successful_ids(name) == ["a", "b"]
    await receiver.wait_for_count(name, 2, timeout=1)


async def test_fail_ids_fails_only_the_named_ids(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    receiver.set_handler(name, fail_ids({"bad"}, times=1, status=503))

    statuses = [
        (await client.post(receiver.url(name), headers={"webhook-id": webhook_id})).status_code
        for webhook_id in ["good", "bad", "bad"]
    ]

    assert statuses == [200, 503, 200]


async def test_retry_after_refuses_with_the_header_then_accepts(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    receiver.set_handler(name, retry_after(7))

    refused = await client.post(receiver.url(name), headers={"webhook-id": "a"})
    accepted = await client.post(receiver.url(name), headers={"webhook-id": "a"})

    assert (refused.status_code, refused.headers["retry-after"]) == (429, "7")
    assert accepted.status_code == 200


async def test_always_answers_the_reply(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    receiver.set_handler(name, always(Reply(status=410, body="gone", headers={"x-why": "test"})))

    response = await client.post(receiver.url(name))

    assert (response.status_code, response.text, response.headers["x-why"]) == (
        410,
        "gone",
        "test",
    )
    assert receiver.successful_ids(name) == []


async def test_a_hanging_reply_does_not_delay_other_names(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    # Long enough that a loaded machine answers the quick one well within it: what counts
    # is that it is answered while the slow one still hangs, not how fast.
    receiver.set_handler(f"{name}-slow", hang(1.5))
    hanging = asyncio.create_task(
        client.post(receiver.url(f"{name}-slow"), headers={"webhook-id": "h"})
    )
    await receiver.wait_for(lambda: receiver.ids(f"{name}-slow") == ["h"], timeout=2)

    quick = await client.post(receiver.url(f"{name}-fast"))

    assert quick.status_code == 200
    assert not hanging.done()
    assert receiver.successful_ids(f"{name}-slow") == []
    assert (await hanging).status_code == 200
    assert receiver.successful_ids(f"{name}-slow") == ["h"]


async def test_a_reply_the_sender_gave_up_on_is_not_successful(
    receiver: WebhookReceiver,
    name: str,
) -> None:
    receiver.set_handler(f"{name}-slow", hang(0.5))

    async with httpx.AsyncClient(timeout=0.1) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.post(receiver.url(f"{name}-slow"), headers={"webhook-id": "h"})

    assert receiver.ids(f"{name}-slow") == ["h"]
    await asyncio.sleep(0.6)
    assert receiver.successful_ids(f"{name}-slow") == []


async def test_leaving_the_block_does_not_wait_for_hanging_replies(
    client: httpx.AsyncClient,
) -> None:
    async with running_receiver() as receiver:
        receiver.set_handler("slow", hang(30))
        hanging = asyncio.create_task(client.post(receiver.url("slow")))
        await receiver.wait_for_count("slow", 1, timeout=2, successful=False)
        started = time.monotonic()

    assert time.monotonic() - started < 3
    assert (await hanging).status_code == 503


async def test_other_paths_and_methods_are_refused(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    assert (await client.post(f"{receiver.base_url}/elsewhere")).status_code == 404
    assert (await client.post(f"{receiver.base_url}/hooks/")).status_code == 404
    assert (await client.post(f"{receiver.url(name)}/deeper")).status_code == 404
    assert (await client.get(receiver.url(name))).status_code == 405
    assert receiver.received(name) == []


async def test_wait_for_count_reports_what_arrived_on_timeout(
    receiver: WebhookReceiver, name: str, client: httpx.AsyncClient
) -> None:
    receiver.set_handler(name, fail_times(5))
    await client.post(receiver.url(name), headers={"webhook-id": "a"})

    with pytest.raises(AssertionError, match=r"saw 0.*\('a', 500\)"):
        await receiver.wait_for_count(name, 1, timeout=0.1)
