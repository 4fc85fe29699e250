"""Verification of inbound webhook signatures, one function per provider scheme.

Every verifier takes the raw request body as bytes (signatures are computed over the exact
bytes sent, so the body must not be parsed and re-serialised first) and an explicit `now`
in Unix seconds, so the replay window is testable and follows the service clock. Timestamps
too far in the past *or* the future are rejected. Signatures are compared with
`hmac.compare_digest`, and no exception message ever contains the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from standardwebhooks import Webhook

MISSING_HEADER = "missing_header"
MALFORMED_HEADER = "malformed_header"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
NO_MATCHING_SIGNATURE = "no_matching_signature"

_UNSIGNED_INTEGER = re.compile(r"[0-9]{1,20}")


class SignatureInvalid(Exception):
    """An inbound webhook failed verification.

    `reason` is a short machine-friendly string: missing_header, malformed_header,
    timestamp_out_of_range, no_matching_signature.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _lowercase_keys(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _required_header(headers: Mapping[str, str], name: str) -> str:
    value = _lowercase_keys(headers).get(name.lower())
    if not value:
        raise SignatureInvalid(MISSING_HEADER, f"the {name} header is missing")
    return value


def _parse_unsigned_integer(raw: str, what: str) -> int:
    # int() alone would also accept " 12", "+12" and "1_2"; a timestamp is plain digits.
    raw = raw.strip()
    if not _UNSIGNED_INTEGER.fullmatch(raw):
        raise SignatureInvalid(MALFORMED_HEADER, f"the {what} is not an unsigned integer")
    return int(raw)


def _check_timestamp(timestamp: float, now: float, tolerance: int) -> None:
    if abs(now - timestamp) > tolerance:
        raise SignatureInvalid(
            TIMESTAMP_OUT_OF_RANGE,
            f"the signed timestamp is more than {tolerance} s away from the current time",
        )


def _any_matches(expected: bytes, candidates: list[bytes]) -> bool:
    # Compare against every candidate (no early exit) so timing does not reveal which matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    return matched


def _no_match() -> SignatureInvalid:
    return SignatureInvalid(NO_MATCHING_SIGNATURE, "no signature matches the payload")


def verify_stripe(
    payload: bytes, header: str | None, secret: str, *, now: float, tolerance: int = 300
) -> None:
    """Verify a `Stripe-Signature` header (`t=<seconds>,v1=<hex>[,v1=<hex>…]`).

    Several `v1` entries appear while a secret is being rolled; any one matching suffices.
    Entries of other schemes (such as `v0`) are ignored.
    """
    if not header:
        raise SignatureInvalid(MISSING_HEADER, "the Stripe-Signature header is missing")
    timestamp_raw: str | None = None
    signatures: list[bytes] = []
    for item in header.split(","):
        key, separator, value = item.strip().partition("=")
        if not separator:
            raise SignatureInvalid(MALFORMED_HEADER, "the Stripe-Signature header is malformed")
        if key == "t" and timestamp_raw is None:
            timestamp_raw = value
        elif key == "v1":
            signatures.append(value.encode("utf-8"))
    if timestamp_raw is None:
        raise SignatureInvalid(MALFORMED_HEADER, "the Stripe-Signature header has no timestamp")
    if not signatures:
        raise SignatureInvalid(MALFORMED_HEADER, "the Stripe-Signature header has no v1 signature")
    timestamp = _parse_unsigned_integer(timestamp_raw, "Stripe-Signature timestamp")
    _check_timestamp(timestamp, now, tolerance)
    signed = f"{timestamp}.".encode() + payload
    expected = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    if not _any_matches(expected.encode("ascii"), signatures):
        raise _no_match()


def verify_hubspot_v3(
    *,
    method: str,
    uri: str,
    body: bytes,
    signature: str | None,
    timestamp_ms: str | None,
    secret: str,
    now: float,
    tolerance: int = 300,
) -> None:
    """Verify HubSpot's `X-HubSpot-Signature-v3` with its `X-HubSpot-Request-Timestamp`.

    The signature is base64(HMAC-SHA256(secret, method + uri + body + timestamp_ms)), where
    `uri` is the full URI HubSpot called (scheme, host, path and query) and the timestamp is
    the header's raw millisecond value. The caller passes the URI as HubSpot sent it.
    """
    if not signature:
        raise SignatureInvalid(MISSING_HEADER, "the X-HubSpot-Signature-v3 header is missing")
    if not timestamp_ms:
        raise SignatureInvalid(MISSING_HEADER, "the X-HubSpot-Request-Timestamp header is missing")
    timestamp = _parse_unsigned_integer(timestamp_ms, "X-HubSpot-Request-Timestamp")
    _check_timestamp(timestamp / 1000, now, tolerance)
    signed = f"{method}{uri}".encode() + body + timestamp_ms.strip().encode("ascii")
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()
    expected = base64.b64encode(digest)
    if not hmac.compare_digest(expected, signature.strip().encode("utf-8")):
        raise _no_match()


def standard_secret_problem(secret: str) -> str | None:
    """Why `secret` cannot be a Standard Webhooks signing secret (base64, optionally after
    `whsec_`), or None."""
    try:
        Webhook(secret)
    except ValueError:
        return "a Standard Webhooks signing secret is base64, optionally after 'whsec_'"
    return None


def verify_standard(
    payload: bytes,
    headers: Mapping[str, str],
    secret: str,
    *,
    now: float,
    tolerance: int = 300,
) -> None:
    """Verify a Standard Webhooks request (`webhook-id`, `webhook-timestamp`, `webhook-signature`).

    The library's own `verify` reads the wall clock, so the window is checked here against
    `now`; the signature itself is computed by `standardwebhooks.Webhook.sign`. The signature
    header holds space-separated `v1,<base64>` entries; any one matching suffices.
    """
    msg_id = _required_header(headers, "webhook-id")
    timestamp_raw = _required_header(headers, "webhook-timestamp")
    signature_header = _required_header(headers, "webhook-signature")
    timestamp = _parse_unsigned_integer(timestamp_raw, "webhook-timestamp")
    _check_timestamp(timestamp, now, tolerance)

    candidates: list[bytes] = []
    for entry in signature_header.split():
        version, separator, encoded = entry.partition(",")
        if version != "v1" or not separator:
            continue
        try:
            candidates.append(base64.b64decode(encoded, validate=True))
        except binascii.Error:
            continue
    if not candidates:
        raise SignatureInvalid(MALFORMED_HEADER, "the webhook-signature header has no v1 signature")

    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureInvalid(NO_MATCHING_SIGNATURE, "the payload is not valid UTF-8") from None
    signed_at = datetime.fromtimestamp(timestamp, tz=UTC)
    try:
        webhook = Webhook(secret)
    except ValueError:  # binascii.Error: not base64, so nothing it signed can match
        raise SignatureInvalid(
            NO_MATCHING_SIGNATURE, "the signing secret is not a Standard Webhooks secret"
        ) from None
    expected_entry = webhook.sign(msg_id=msg_id, timestamp=signed_at, data=text)
    expected = base64.b64decode(expected_entry.partition(",")[2])
    if not _any_matches(expected, candidates):
        raise _no_match()


@dataclass(frozen=True)
class HmacScheme:
    """How a provider without a dedicated verifier signs its webhooks.

    When `timestamp_header` is set, the signed content is `f"{timestamp}.{body}"` and the
    timestamp (Unix seconds) must lie within `tolerance` seconds of now.
    """

    header: str
    algorithm: Literal["sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""  # e.g. "sha256=", as GitHub sends it
    timestamp_header: str | None = None
    tolerance: int = 300


def _decode_signature(value: str, scheme: HmacScheme) -> bytes:
    try:
        if scheme.encoding == "hex":
            return bytes.fromhex(value)
        return base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error is a ValueError
        raise SignatureInvalid(
            MALFORMED_HEADER, f"the {scheme.header} header is not valid {scheme.encoding}"
        ) from None


def verify_hmac(
    payload: bytes, headers: Mapping[str, str], secret: str, scheme: HmacScheme, *, now: float
) -> None:
    """Verify a plain HMAC signature header described by `scheme`."""
    value = _required_header(headers, scheme.header).strip()
    if scheme.prefix:
        if not value.startswith(scheme.prefix):
            raise SignatureInvalid(
                MALFORMED_HEADER, f"the {scheme.header} header lacks the {scheme.prefix!r} prefix"
            )
        value = value[len(scheme.prefix) :]
    provided = _decode_signature(value, scheme)

    signed = payload
    if scheme.timestamp_header is not None:
        timestamp_raw = _required_header(headers, scheme.timestamp_header)
        timestamp = _parse_unsigned_integer(timestamp_raw, scheme.timestamp_header)
        _check_timestamp(timestamp, now, scheme.tolerance)
        signed = f"{timestamp_raw.strip()}.".encode() + payload

    expected = hmac.new(secret.encode("utf-8"), signed, scheme.algorithm).digest()
    if not hmac.compare_digest(expected, provided):
        raise _no_match()


def verify_sendgrid(
    payload: bytes,
    headers: Mapping[str, str],
    public_key: ec.EllipticCurvePublicKey,
    *,
    now: float,
    tolerance: int = 300,
) -> None:
    """Verify SendGrid's Signed Event Webhook.

    `X-Twilio-Email-Event-Webhook-Signature` is a base64 DER ECDSA signature (P-256,
    SHA-256) over the raw `X-Twilio-Email-Event-Webhook-Timestamp` value followed by the
    body. SendGrid documents no replay window; the timestamp is held to `tolerance` as for
    the other schemes, which SendGrid's prompt delivery meets.
    """
    signature_raw = _required_header(headers, "X-Twilio-Email-Event-Webhook-Signature")
    timestamp_raw = _required_header(headers, "X-Twilio-Email-Event-Webhook-Timestamp")
    try:
        signature = base64.b64decode(signature_raw.strip(), validate=True)
    except binascii.Error:
        raise SignatureInvalid(
            MALFORMED_HEADER, "the X-Twilio-Email-Event-Webhook-Signature header is not base64"
        ) from None
    timestamp = _parse_unsigned_integer(timestamp_raw, "X-Twilio-Email-Event-Webhook-Timestamp")
    _check_timestamp(timestamp, now, tolerance)
    try:
        public_key.verify(
            signature, timestamp_raw.encode("ascii") + payload, ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        raise _no_match() from None


TWILIO_ALGORITHMS = {"HMAC_SHA1": "sha1", "HMAC_SHA256": "sha256"}


def twilio_signature(
    url: str,
    params: Sequence[tuple[str, str]],
    secret: str,
    algorithm: Literal["sha1", "sha256"] = "sha1",
) -> str:
    """The `X-Twilio-Signature` of a request as Twilio's own validator computes it:
    base64(HMAC(secret, url + each parameter name (sorted) followed by its distinct values
    (sorted))), the URL exactly as Twilio requested it."""
    by_name: dict[str, set[str]] = {}
    for name, value in params:
        by_name.setdefault(name, set()).add(value)
    signed = url + "".join(
        name + value for name in sorted(by_name) for value in sorted(by_name[name])
    )
    digest = hmac.new(secret.encode("utf-8"), signed.encode("utf-8"), algorithm).digest()
    return base64.b64encode(digest).decode("ascii")


def _url_port_variants(url: str) -> list[str]:
    """The URL without and with its default port: Twilio signs either form."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    userinfo = parts.netloc[: len(parts.netloc) - len(host)]
    try:
        given_port = parts.port
    except ValueError:  # a Host header with a port that is not one: nothing was signed so
        raise SignatureInvalid(MALFORMED_HEADER, "the request's Host has no valid port") from None
    bare_host = host.split(":")[0] if given_port is not None else host
    port = given_port or (443 if parts.scheme == "https" else 80)
    without = urllib.parse.urlunsplit(parts._replace(netloc=userinfo + bare_host))
    with_port = urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}{bare_host}:{port}"))
    return [without, with_port]


def verify_twilio(
    *,
    url: str,
    body: bytes,
    signature: str | None,
    secrets: Sequence[str],
    algorithm: Literal["sha1", "sha256"] = "sha1",
) -> None:
    """Verify `X-Twilio-Signature` as `twilio.request_validator.RequestValidator` does.

    A form-encoded body's parameters are signed with the URL; a JSON body is not, and the
    URL then carries `bodySHA256`, the hex SHA-256 of the body. The URL is tried without
    and with its default port. Twilio signs no time: a replay is caught by the event id.
    Any of `secrets` (the auth token, a secondary one while it is rotated) may match.
    """
    if not signature:
        raise SignatureInvalid(MISSING_HEADER, "the X-Twilio-Signature header is missing")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    params: list[tuple[str, str]] = []
    if "bodySHA256" in query:
        digest = hashlib.sha256(body).hexdigest()
        if not hmac.compare_digest(digest.encode(), query["bodySHA256"][0].encode()):
            raise SignatureInvalid(NO_MATCHING_SIGNATURE, "the body does not match bodySHA256")
    else:
        try:
            params = urllib.parse.parse_qsl(
                body.decode("utf-8"), keep_blank_values=True, strict_parsing=False
            )
        except UnicodeDecodeError:
            raise SignatureInvalid(NO_MATCHING_SIGNATURE, "the body is not UTF-8") from None
    provided = signature.strip().encode("utf-8")
    candidates = [
        twilio_signature(variant, params, secret, algorithm).encode("ascii")
        for secret in secrets
        for variant in _url_port_variants(url)
    ]
    if not _any_matches(provided, candidates):
        raise _no_match()
