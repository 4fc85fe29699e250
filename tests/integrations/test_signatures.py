"""Inbound webhook verification, checked against headers built by the providers' own libraries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
import stripe
from hubspot.utils.signature import Signature
from standardwebhooks import Webhook

from memberhub.integrations.signatures import (
    HmacScheme,
    SignatureInvalid,
    verify_hmac,
    verify_hubspot_v3,
    verify_standard,
    verify_stripe,
)

NOW = 1_700_000_000
PAYLOAD = b'{"id": "evt_1", "type": "invoice.paid", "amount": 4200}'
TAMPERED = b'{"id": "evt_1", "type": "invoice.paid", "amount": 9900}'

STRIPE_SECRET = "whsec_stripe_test_secret_0123456789"
HUBSPOT_SECRET = "hubspot-client-secret-0123456789"
HUBSPOT_URI = "https://hub.example.com/webhooks/hubspot?portal=42"
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
GENERIC_SECRET = "generic-shared-secret-0123456789"

ALL_SECRETS = [STRIPE_SECRET, HUBSPOT_SECRET, STANDARD_SECRET, GENERIC_SECRET]


def assert_rejected(error: pytest.ExceptionInfo[SignatureInvalid], reason: str) -> None:
    assert error.value.reason == reason
    for secret in ALL_SECRETS:
        assert secret not in str(error.value)
        assert secret not in repr(error.value)


# --- Stripe -------------------------------------------------------------------------------


def stripe_header(payload: bytes, secret: str, timestamp: int) -> str:
    header = stripe.WebhookSignature.generate_signature_header(
        payload.decode(), secret, timestamp=timestamp
    )
    assert isinstance(header, str)
    return header


def test_stripe_header_from_official_library_is_accepted_by_both_verifiers() -> None:
    header = stripe_header(PAYLOAD, STRIPE_SECRET, NOW)
    signed = f"{NOW}.{PAYLOAD.decode()}"
    assert (
        header == f"t={NOW},v1={stripe.WebhookSignature._compute_signature(signed, STRIPE_SECRET)}"
    )
    assert stripe.WebhookSignature.verify_header(PAYLOAD, header, STRIPE_SECRET)

    verify_stripe(PAYLOAD, header, STRIPE_SECRET, now=NOW + 10)


def test_stripe_accepts_any_one_of_several_v1_signatures() -> None:
    valid = stripe_header(PAYLOAD, STRIPE_SECRET, NOW).split(",v1=")[1]
    header = f"t={NOW},v1={'0' * 64},v1={valid},v0={'f' * 64},v1={'a' * 64}"
    assert stripe.WebhookSignature.verify_header(PAYLOAD, header, STRIPE_SECRET)

    verify_stripe(PAYLOAD, header, STRIPE_SECRET, now=NOW)


@pytest.mark.parametrize(
    ("payload", "secret"),
    [(TAMPERED, STRIPE_SECRET), (PAYLOAD, "whsec_some_other_secret")],
    ids=["tampered_body", "wrong_secret"],
)
def test_stripe_rejects_signature_that_does_not_match(payload: bytes, secret: str) -> None:
    header = stripe_header(PAYLOAD, STRIPE_SECRET, NOW)
    with pytest.raises(SignatureInvalid) as error:
        verify_stripe(payload, header, secret, now=NOW)
    assert_rejected(error, "no_matching_signature")


@pytest.mark.parametrize("signed_at", [NOW - 301, NOW + 301], ids=["stale", "future"])
def test_stripe_rejects_timestamp_outside_tolerance(signed_at: int) -> None:
    header = stripe_header(PAYLOAD, STRIPE_SECRET, signed_at)
    with pytest.raises(SignatureInvalid) as error:
        verify_stripe(PAYLOAD, header, STRIPE_SECRET, now=NOW)
    assert_rejected(error, "timestamp_out_of_range")


def test_stripe_accepts_timestamp_at_the_edge_of_tolerance() -> None:
    for signed_at in (NOW - 300, NOW + 300):
        verify_stripe(
            PAYLOAD, stripe_header(PAYLOAD, STRIPE_SECRET, signed_at), STRIPE_SECRET, now=NOW
        )


@pytest.mark.parametrize("header", [None, ""])
def test_stripe_rejects_missing_header(header: str | None) -> None:
    with pytest.raises(SignatureInvalid) as error:
        verify_stripe(PAYLOAD, header, STRIPE_SECRET, now=NOW)
    assert_rejected(error, "missing_header")


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        f"v1={'0' * 64}",
        f"t={NOW}",
        f"t=soon,v1={'0' * 64}",
        f"t=-{NOW},v1={'0' * 64}",
        f"t={NOW},v0={'0' * 64}",
    ],
)
def test_stripe_rejects_malformed_header(header: str) -> None:
    with pytest.raises(SignatureInvalid) as error:
        verify_stripe(PAYLOAD, header, STRIPE_SECRET, now=NOW)
    assert_rejected(error, "malformed_header")


# --- HubSpot v3 ---------------------------------------------------------------------------


def hubspot_signature(body: bytes, timestamp_ms: str, *, method: str = "POST") -> str:
    return Signature.get_signature(
        HUBSPOT_SECRET,
        body.decode(),
        "v3",
        http_uri=HUBSPOT_URI,
        http_method=method,
        timestamp=timestamp_ms,
    )


def test_hubspot_signature_from_official_library_is_accepted_by_both_verifiers() -> None:
    # The library's is_valid reads the wall clock, so this one test signs "now".
    now = time.time()
    timestamp_ms = str(int(now * 1000))
    signature = hubspot_signature(PAYLOAD, timestamp_ms)
    assert Signature.is_valid(
        signature,
        HUBSPOT_SECRET,
        PAYLOAD.decode(),
        http_uri=HUBSPOT_URI,
        http_method="POST",
        signature_version="v3",
        timestamp=timestamp_ms,
    )

    verify_hubspot_v3(
        method="POST",
        uri=HUBSPOT_URI,
        body=PAYLOAD,
        signature=signature,
        timestamp_ms=timestamp_ms,
        secret=HUBSPOT_SECRET,
        now=now,
    )


def test_hubspot_signature_matches_the_documented_algorithm() -> None:
    timestamp_ms = str(NOW * 1000)
    source = f"POST{HUBSPOT_URI}{PAYLOAD.decode()}{timestamp_ms}".encode()
    digest = hmac.new(HUBSPOT_SECRET.encode(), source, hashlib.sha256).digest()
    assert hubspot_signature(PAYLOAD, timestamp_ms) == base64.b64encode(digest).decode()


@pytest.mark.parametrize(
    ("method", "uri", "body", "secret"),
    [
        ("POST", HUBSPOT_URI, TAMPERED, HUBSPOT_SECRET),
        ("POST", HUBSPOT_URI, PAYLOAD, "another-client-secret"),
        ("POST", "https://hub.example.com/webhooks/hubspot?portal=43", PAYLOAD, HUBSPOT_SECRET),
        ("PUT", HUBSPOT_URI, PAYLOAD, HUBSPOT_SECRET),
    ],
    ids=["tampered_body", "wrong_secret", "other_uri", "other_method"],
)
def test_hubspot_rejects_signature_that_does_not_match(
    method: str, uri: str, body: bytes, secret: str
) -> None:
    timestamp_ms = str(NOW * 1000)
    with pytest.raises(SignatureInvalid) as error:
        verify_hubspot_v3(
            method=method,
            uri=uri,
            body=body,
            signature=hubspot_signature(PAYLOAD, timestamp_ms),
            timestamp_ms=timestamp_ms,
            secret=secret,
            now=NOW,
        )
    assert_rejected(error, "no_matching_signature")


@pytest.mark.parametrize(
    "signed_at_ms",
    [(NOW - 301) * 1000, (NOW + 301) * 1000],
    ids=["stale", "future"],
)
def test_hubspot_rejects_timestamp_outside_five_minutes(signed_at_ms: int) -> None:
    timestamp_ms = str(signed_at_ms)
    with pytest.raises(SignatureInvalid) as error:
        verify_hubspot_v3(
            method="POST",
            uri=HUBSPOT_URI,
            body=PAYLOAD,
            signature=hubspot_signature(PAYLOAD, timestamp_ms),
            timestamp_ms=timestamp_ms,
            secret=HUBSPOT_SECRET,
            now=NOW,
        )
    assert_rejected(error, "timestamp_out_of_range")


@pytest.mark.parametrize(
    ("signature", "timestamp_ms", "reason"),
    [
        (None, str(NOW * 1000), "missing_header"),
        ("c2lnbmF0dXJl", None, "missing_header"),
        ("c2lnbmF0dXJl", "", "missing_header"),
        ("c2lnbmF0dXJl", "yesterday", "malformed_header"),
        ("c2lnbmF0dXJl", f"{NOW}.5", "malformed_header"),
    ],
)
def test_hubspot_rejects_missing_or_malformed_headers(
    signature: str | None, timestamp_ms: str | None, reason: str
) -> None:
    with pytest.raises(SignatureInvalid) as error:
        verify_hubspot_v3(
            method="POST",
            uri=HUBSPOT_URI,
            body=PAYLOAD,
            signature=signature,
            timestamp_ms=timestamp_ms,
            secret=HUBSPOT_SECRET,
            now=NOW,
        )
    assert_rejected(error, reason)


# --- Standard Webhooks --------------------------------------------------------------------

SPEC_MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_PAYLOAD = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def spec_headers(**overrides: str) -> dict[str, str]:
    headers = {
        "webhook-id": SPEC_MSG_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }
    headers.update({name.replace("_", "-"): value for name, value in overrides.items()})
    return headers


def test_standard_webhooks_known_answer_vector_is_accepted() -> None:
    verify_standard(SPEC_PAYLOAD, spec_headers(), STANDARD_SECRET, now=SPEC_TIMESTAMP)


def test_standard_webhooks_header_names_are_case_insensitive() -> None:
    headers = {name.title(): value for name, value in spec_headers().items()}
    assert "Webhook-Signature" in headers
    verify_standard(SPEC_PAYLOAD, headers, STANDARD_SECRET, now=SPEC_TIMESTAMP)


def test_standard_webhooks_accepts_any_one_of_several_signatures() -> None:
    signature = f"v1,{base64.b64encode(b'x' * 32).decode()} v2,abc {SPEC_SIGNATURE}"
    headers = spec_headers(webhook_signature=signature)
    verify_standard(SPEC_PAYLOAD, headers, STANDARD_SECRET, now=SPEC_TIMESTAMP)


def test_standard_webhooks_signature_from_library_sign_is_accepted() -> None:
    signed_at = datetime.fromtimestamp(NOW, tz=UTC)
    signature = Webhook(STANDARD_SECRET).sign("msg_1", signed_at, PAYLOAD.decode())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(NOW), "webhook-signature": signature}
    verify_standard(PAYLOAD, headers, STANDARD_SECRET, now=NOW)


@pytest.mark.parametrize(
    ("payload", "headers", "secret"),
    [
        (b'{"test": 2432232315}', spec_headers(), STANDARD_SECRET),
        (SPEC_PAYLOAD, spec_headers(), "whsec_" + base64.b64encode(b"other" * 6).decode()),
        (SPEC_PAYLOAD, spec_headers(webhook_id="msg_other"), STANDARD_SECRET),
    ],
    ids=["tampered_body", "wrong_secret", "other_msg_id"],
)
def test_standard_webhooks_rejects_signature_that_does_not_match(
    payload: bytes, headers: dict[str, str], secret: str
) -> None:
    with pytest.raises(SignatureInvalid) as error:
        verify_standard(payload, headers, secret, now=SPEC_TIMESTAMP)
    assert_rejected(error, "no_matching_signature")


@pytest.mark.parametrize("offset", [-301, 301], ids=["stale", "future"])
def test_standard_webhooks_rejects_timestamp_outside_tolerance(offset: int) -> None:
    with pytest.raises(SignatureInvalid) as error:
        verify_standard(SPEC_PAYLOAD, spec_headers(), STANDARD_SECRET, now=SPEC_TIMESTAMP - offset)
    assert_rejected(error, "timestamp_out_of_range")


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_standard_webhooks_rejects_missing_header(missing: str) -> None:
    headers = spec_headers()
    del headers[missing]
    with pytest.raises(SignatureInvalid) as error:
        verify_standard(SPEC_PAYLOAD, headers, STANDARD_SECRET, now=SPEC_TIMESTAMP)
    assert_rejected(error, "missing_header")


@pytest.mark.parametrize(
    "overrides",
    [
        {"webhook_timestamp": "not-a-number"},
        {"webhook_signature": "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="},
        {"webhook_signature": "v1,***not-base64***"},
    ],
)
def test_standard_webhooks_rejects_malformed_header(overrides: dict[str, str]) -> None:
    with pytest.raises(SignatureInvalid) as error:
        verify_standard(
            SPEC_PAYLOAD, spec_headers(**overrides), STANDARD_SECRET, now=SPEC_TIMESTAMP
        )
    assert_rejected(error, "malformed_header")


# --- Generic HMAC -------------------------------------------------------------------------


def generic_signature(scheme: HmacScheme, payload: bytes, timestamp: int | None = None) -> str:
    signed = payload if timestamp is None else f"{timestamp}.".encode() + payload
    digest = hmac.new(GENERIC_SECRET.encode(), signed, scheme.algorithm).digest()
    encoded = digest.hex() if scheme.encoding == "hex" else base64.b64encode(digest).decode()
    return scheme.prefix + encoded


SCHEMES = [
    HmacScheme(header="X-Signature"),
    HmacScheme(header="X-Signature", encoding="base64"),
    HmacScheme(header="X-Signature", algorithm="sha512"),
    HmacScheme(header="X-Signature", algorithm="sha512", encoding="base64"),
    HmacScheme(header="X-Hub-Signature-256", prefix="sha256="),
]
SCHEME_IDS = ["hex_sha256", "base64_sha256", "hex_sha512", "base64_sha512", "prefixed"]


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_generic_hmac_accepts_valid_signature(scheme: HmacScheme) -> None:
    headers = {scheme.header.upper(): generic_signature(scheme, PAYLOAD)}
    verify_hmac(PAYLOAD, headers, GENERIC_SECRET, scheme, now=NOW)


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_generic_hmac_rejects_tampered_body_and_wrong_secret(scheme: HmacScheme) -> None:
    headers = {scheme.header: generic_signature(scheme, PAYLOAD)}
    for payload, secret in [(TAMPERED, GENERIC_SECRET), (PAYLOAD, "another-shared-secret")]:
        with pytest.raises(SignatureInvalid) as error:
            verify_hmac(payload, headers, secret, scheme, now=NOW)
        assert_rejected(error, "no_matching_signature")


def test_generic_hmac_rejects_signature_of_another_algorithm() -> None:
    sha512 = HmacScheme(header="X-Signature", algorithm="sha512")
    headers = {"X-Signature": generic_signature(sha512, PAYLOAD)}
    with pytest.raises(SignatureInvalid) as error:
        verify_hmac(PAYLOAD, headers, GENERIC_SECRET, HmacScheme(header="X-Signature"), now=NOW)
    assert_rejected(error, "no_matching_signature")


@pytest.mark.parametrize(
    ("scheme", "value"),
    [
        (HmacScheme(header="X-Signature"), "zz-not-hex"),
        (HmacScheme(header="X-Signature", encoding="base64"), "***"),
        (HmacScheme(header="X-Signature", prefix="sha256="), "0" * 64),
    ],
    ids=["bad_hex", "bad_base64", "missing_prefix"],
)
def test_generic_hmac_rejects_malformed_header(scheme: HmacScheme, value: str) -> None:
    with pytest.raises(SignatureInvalid) as error:
        verify_hmac(PAYLOAD, {"X-Signature": value}, GENERIC_SECRET, scheme, now=NOW)
    assert_rejected(error, "malformed_header")


def test_generic_hmac_rejects_missing_header() -> None:
    with pytest.raises(SignatureInvalid) as error:
        verify_hmac(PAYLOAD, {}, GENERIC_SECRET, HmacScheme(header="X-Signature"), now=NOW)
    assert_rejected(error, "missing_header")


TIMESTAMPED = HmacScheme(header="X-Signature", timestamp_header="X-Timestamp", tolerance=60)


def test_generic_hmac_with_timestamp_signs_timestamp_dot_body() -> None:
    headers = {
        "x-signature": generic_signature(TIMESTAMPED, PAYLOAD, NOW),
        "x-timestamp": str(NOW),
    }
    verify_hmac(PAYLOAD, headers, GENERIC_SECRET, TIMESTAMPED, now=NOW + 60)

    body_only = {**headers, "x-signature": generic_signature(TIMESTAMPED, PAYLOAD)}
    with pytest.raises(SignatureInvalid) as error:
        verify_hmac(PAYLOAD, body_only, GENERIC_SECRET, TIMESTAMPED, now=NOW)
    assert_rejected(error, "no_matching_signature")


@pytest.mark.parametrize("signed_at", [NOW - 61, NOW + 61], ids=["stale", "future"])
def test_generic_hmac_rejects_timestamp_outside_tolerance(signed_at: int) -> None:
    headers = {
        "X-Signature": generic_signature(TIMESTAMPED, PAYLOAD, signed_at),
        "X-Timestamp": str(signed_at),
    }
    with pytest.raises(SignatureInvalid) as error:
        verify_hmac(PAYLOAD, headers, GENERIC_SECRET, TIMESTAMPED, now=NOW)
    assert_rejected(error, "timestamp_out_of_range")


def test_generic_hmac_rejects_missing_timestamp_header() -> None:
    headers = {"X-Signature": generic_signature(TIMESTAMPED, PAYLOAD, NOW)}
    with pytest.raises(SignatureInvalid) as error:
        verify_hmac(PAYLOAD, headers, GENERIC_SECRET, TIMESTAMPED, now=NOW)
    assert_rejected(error, "missing_header")
