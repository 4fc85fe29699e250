"""Standard Webhooks signing, checked against the specification's published known answer
and the official `standardwebhooks` library, and event-type patterns."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from memberhub.events.catalog import CATALOG
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.delivery import fan_out
from memberhub.webhooks.signing import (
    TypeMatcher,
    matches,
    new_secret,
    signature_header,
    unknown_patterns,
)
from tests.support import ApiClient
from tests.webhooks.conftest import create_endpoint, delivery_loop

# The known-answer vector published with the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_PAYLOAD = '{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers_for(msg_id: str, timestamp: datetime, signature: str) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }


# ---------------------------------------------------------------- signatures


def test_the_signature_reproduces_the_specifications_known_answer() -> None:
    timestamp = datetime.fromtimestamp(SPEC_TIMESTAMP, UTC)

    header = signature_header([SPEC_SECRET], SPEC_MSG_ID, timestamp, SPEC_PAYLOAD)

    assert header == SPEC_SIGNATURE


def test_a_new_secret_is_whsec_and_32_random_bytes() -> None:
    secrets = {new_secret() for _ in range(20)}

    assert len(secrets) == 20
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
        Webhook(secret)  # the official library accepts it


def test_with_two_secrets_the_header_carries_one_signature_each_and_either_verifies() -> None:
    current, previous, stranger = new_secret(), new_secret(), new_secret()
    now = datetime.now(UTC)
    body = json.dumps({"id": "evt_1", "type": "member.created", "data": {"name": "Zoë"}})

    header = signature_header([current, previous], "evt_1", now, body)

    signatures = header.split(" ")
    assert len(signatures) == 2
    assert signatures[0] == signature_header([current], "evt_1", now, body)
    assert signatures[1] == signature_header([previous], "evt_1", now, body)
    assert all(s.startswith("v1,") for s in signatures)
    headers = headers_for("evt_1", now, header)
    for secret in (current, previous):
        assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(current).verify(body + " ", headers)


def test_a_signature_is_bound_to_the_message_id_and_timestamp() -> None:
    secret = new_secret()
    now = datetime.now(UTC)
    body = '{"a":1}'
    header = signature_header([secret], "evt_1", now, body)

    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers_for("evt_2", now, header))
    later = datetime.fromtimestamp(now.timestamp() + 1, UTC)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers_for("evt_1", later, header))


async def test_the_payload_the_delivery_loop_builds_verifies_with_the_endpoints_secret(
    api: ApiClient, db: Database, settings: Settings
) -> None:
    endpoint = await create_endpoint(api, "https://93.184.215.14/hooks", ["member.created"])
    member = await api.create_member(first_name="Zoë", last_name="李")
    async with db.transaction() as session:
        assert await fan_out(session, utcnow()) == 1
    loop = delivery_loop(db, settings)

    [claimed] = await loop.claim()
    body = loop.payload(claimed)
    now = datetime.now(UTC)
    header = signature_header(claimed.endpoint.secrets, claimed.event_public_id, now, body)

    assert claimed.endpoint.public_id == endpoint["id"]
    headers = headers_for(claimed.event_public_id, now, header)
    verified = Webhook(endpoint["secret"]).verify(body.encode(), headers)
    assert verified == json.loads(body)
    assert set(verified) == {"id", "type", "version", "occurred_at", "data"}
    assert verified["id"] == claimed.event_public_id
    assert verified["type"] == "member.created"
    assert verified["occurred_at"].endswith("Z")
    assert verified["data"]["member"]["id"] == member["id"]
    assert verified["data"]["member"]["first_name"] == "Zoë"
    assert "李" in body  # sent as UTF-8, not \\u escapes: the signed text is the sent text


# ---------------------------------------------------------------- event-type patterns


@pytest.mark.parametrize(
    ("pattern", "event_type", "expected"),
    [
        ("*", "member.created", True),
        ("*", "webhook.test", True),
        ("member.created", "member.created", True),
        ("member.created", "member.updated", False),
        ("member.created", "member.created.extra", False),
        ("member", "member.created", False),
        ("member.*", "member.created", True),
        ("member.*", "member.status.changed", True),
        ("member.*", "member", False),
        ("member.*", "membership.created", False),
        ("member.*", "points.earned", False),
        ("member.status.*", "member.status.changed", True),
        ("member.status.*", "member.created", False),
        ("points.earned.*", "points.earned", False),
    ],
)
def test_matches(pattern: str, event_type: str, expected: bool) -> None:
    assert matches(pattern, event_type) is expected


def test_a_type_matcher_matches_any_of_its_patterns_and_answers_the_same_twice() -> None:
    matcher = TypeMatcher(["points.*", "member.created"])

    for _ in range(2):
        assert matcher("points.earned")
        assert matcher("points.expired")
        assert matcher("member.created")
        assert not matcher("member.updated")
        assert not matcher("reward.claimed")
    assert not TypeMatcher([])("member.created")
    assert TypeMatcher(["*"])("alert.raised")


def test_unknown_patterns_are_those_matching_no_catalog_type_in_the_order_given() -> None:
    patterns = [
        "member.*",
        "nothing.*",
        "points.earned",
        "points.earned.*",
        "*",
        "webhook.test",
        "member.status.*",
        "member.create",
        "nothing.*",
    ]

    assert unknown_patterns(patterns) == [
        "nothing.*",
        "points.earned.*",
        "member.create",
        "nothing.*",
    ]
    assert unknown_patterns(list(CATALOG)) == []
    assert unknown_patterns([]) == []
