"""A stateful fake of the Salesforce REST API (v60.0) for Contact and Lead records.

`running_fake_salesforce` serves it on a free port of 127.0.0.1, under uvicorn in a thread
with its own event loop (as `tests.fakes.stripe` does); `fake.url` is the instance URL:

    async with running_fake_salesforce() as fake:
        fake.add_field("Contact", "Member_Id__c", external_id=True)
        contact_id = fake.add_record("Contact", {"LastName": "Lovelace"}, modstamp=when)
        fake.fail_next(1, status=503)
        ...point the CRM connection at fake.url with DEFAULT_TOKEN and sync...
        assert fake.writes() == 0

Endpoints (under `/services/data/v60.0`): `PATCH /composite/sobjects/{Object}/{Field}`
(upsert by external id, or by `Email`, which Salesforce marks idLookup), `POST` and `PATCH`
`/composite/sobjects` (create, update by Id), `GET|PATCH /sobjects/{Object}/{Id}`,
`GET /query?q=<SOQL>`, `GET /query/{locator}` and `GET /limits`; plus
`POST /services/oauth2/token` (refresh-token grant). Answers have Salesforce's shapes:
errors are a JSON list `[{"message", "errorCode"}]`, per-record results of sObject
Collections are `{"id", "success", "errors": [{"statusCode", "message", "fields"}]}`.

Checks apply in this order: latency, the bearer token (401 INVALID_SESSION_ID), programmed
failures (`fail_next`, then `rate_limit_next`, the window of `set_rate_limit`, then
`random_failures`), the daily request limit (403 REQUEST_LIMIT_EXCEEDED), then the
endpoint. Nothing before the endpoint changes a record, so a retried request is safe.
Requests that pass the token check count towards `api-usage` in the `Sforce-Limit-Info`
header, except those refused by the daily limit. The token endpoint is never failed or
limited by the programming.

Salesforce answers no 429 for REST calls: its concurrent-request limit (and the daily
total) is refused with 403 `REQUEST_LIMIT_EXCEEDED`, told apart only by the message
("ConcurrentPerOrgLongTxn Limit exceeded." vs "TotalRequests Limit exceeded."), with no
Retry-After header. `rate_limit_next` and `set_rate_limit` emulate the concurrent limit so.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import random
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

API_VERSION = "v60.0"
DATA_PATH = f"/services/data/{API_VERSION}"
TOKEN_PATH = "/services/oauth2/token"
DEFAULT_TOKEN = "00DFAKE0000000001!AQ0AQFakeSalesforceAccessToken0000000000000000"
DEFAULT_CLIENT_ID = "3MVG9FakeMemberhubConnectedAppConsumerKey0000000000"
DEFAULT_CLIENT_SECRET = "FAKE0000000000000000000000000000000000000000000000000000000000001"
DEFAULT_REFRESH_TOKEN = "5Aep861FakeMemberhubRefreshToken000000000000000000000000000000"
ORG_ID = "00DRO000000FAKEMAA"
INTEGRATION_USER_ID = "005RO000000FAKEYAA"
DEFAULT_DAILY_LIMIT = 100_000
MAX_COLLECTION_RECORDS = 200
DEFAULT_QUERY_BATCH = 2000
MIN_QUERY_BATCH = 200

OBJECT_PREFIXES = {"Contact": "003", "Lead": "00Q"}
COMMON_FIELDS = (
    "Id",
    "FirstName",
    "LastName",
    "Name",
    "Email",
    "Phone",
    "OwnerId",
    "LeadSource",
    "Description",
    "CreatedDate",
    "LastModifiedDate",
    "SystemModstamp",
    "IsDeleted",
)
STANDARD_FIELDS = {"Contact": COMMON_FIELDS, "Lead": (*COMMON_FIELDS, "Company", "Status")}
READ_ONLY_FIELDS = frozenset(
    {"Id", "Name", "CreatedDate", "LastModifiedDate", "SystemModstamp", "IsDeleted"}
)
DATETIME_FIELDS = frozenset({"CreatedDate", "LastModifiedDate", "SystemModstamp"})
BOOLEAN_FIELDS = frozenset({"IsDeleted"})
REQUIRED_FIELDS = {"Contact": ("LastName",), "Lead": ("LastName", "Company")}
# Salesforce's field lengths; custom text fields here are Text(255).
MAX_LENGTHS = {
    "FirstName": 40,
    "LastName": 80,
    "Email": 80,
    "Phone": 40,
    "LeadSource": 255,
    "Description": 32000,
    "Company": 255,
}
CUSTOM_FIELD_MAX_LENGTH = 255
LEAD_STATUSES = (
    "Open - Not Contacted",
    "Working - Contacted",
    "Closed - Converted",
    "Closed - Not Converted",
)
# Contact.Email and Lead.Email have the idLookup property: usable to upsert, not unique.
ID_LOOKUP_FIELDS = frozenset({"Email"})
EMAIL_PATTERN = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_ID_SUFFIX_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Record = dict[str, Any]


# --------------------------------------------------------------------------- ids and times


def id18(id15: str) -> str:
    """The 18-character, case-insensitive-safe form of a 15-character Salesforce id."""
    if len(id15) != 15:
        return id15
    suffix = ""
    for chunk in range(3):
        bits = sum(
            1 << position
            for position, char in enumerate(id15[chunk * 5 : chunk * 5 + 5])
            if char.isupper()
        )
        suffix += _ID_SUFFIX_ALPHABET[bits]
    return id15 + suffix


def _base62(number: int, width: int) -> str:
    digits = ""
    while number:
        number, remainder = divmod(number, 62)
        digits = _BASE62[remainder] + digits
    return digits.rjust(width, "0")


def format_datetime(value: datetime) -> str:
    """A datetime as Salesforce writes it: `2024-05-01T12:00:00.000+0000`."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}+0000"


def _to_millis(value: datetime) -> datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


_DATETIME_LITERAL = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,3}))?(Z|[+-]\d{2}:?\d{2})$"
)


def parse_datetime(text: str) -> datetime | None:
    """A SOQL dateTime literal (`...Z`, `...+0000`, `...+00:00`, with optional millis)."""
    match = _DATETIME_LITERAL.match(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, millis, zone = match.groups()
    if zone == "Z":
        offset = timedelta(0)
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    try:
        naive = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((millis or "0").ljust(3, "0")) * 1000,
        )
    except ValueError:
        return None
    return (naive - offset).replace(tzinfo=UTC)


# --------------------------------------------------------------------------- errors


class SalesforceError(Exception):
    """A whole-request error, rendered as Salesforce's `[{"message", "errorCode"}]`."""

    def __init__(
        self,
        status: int,
        error_code: str,
        message: str,
        *,
        fields: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.fields = fields

    def body(self) -> list[dict[str, Any]]:
        error: dict[str, Any] = {"message": self.message, "errorCode": self.error_code}
        if self.fields is not None:
            error["fields"] = self.fields
        return [error]


class _OAuthError(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass(frozen=True)
class RecordError:
    """One error of one record in an sObject Collections answer."""

    status_code: str
    message: str
    fields: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"statusCode": self.status_code, "message": self.message, "fields": self.fields}


ROLLED_BACK = RecordError(
    "ALL_OR_NONE_OPERATION_ROLLED_BACK",
    "Record rolled back because not all records were valid and the request was using "
    "AllOrNone header",
)


def _not_found() -> SalesforceError:
    return SalesforceError(404, "NOT_FOUND", "The requested resource does not exist")


def _malformed(message: str) -> SalesforceError:
    return SalesforceError(400, "MALFORMED_QUERY", message)


def _unknown_error(status: int) -> SalesforceError:
    if status == 503:
        return SalesforceError(
            503,
            "SERVER_UNAVAILABLE",
            "Server is temporarily unavailable to handle this request, please try again later.",
        )
    error_id = f"{secrets.randbelow(10**10):010d}-{secrets.randbelow(10**6)}"
    return SalesforceError(
        status,
        "UNKNOWN_EXCEPTION",
        f"An unexpected error occurred. Please include this ErrorId if you contact support: "
        f"{error_id} ({-secrets.randbelow(10**9)})",
    )


def _concurrent_limit() -> SalesforceError:
    return SalesforceError(403, "REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded.")


# --------------------------------------------------------------------------- SOQL


class _Condition(NamedTuple):
    field: str
    op: str  # = != < <= > >= IN NOTIN
    value: Any  # a list for IN / NOTIN


class _Order(NamedTuple):
    field: str
    descending: bool
    nulls_last: bool


class SoqlQuery(NamedTuple):
    """The subset of SOQL the fake understands, with canonical field names."""

    object_name: str
    fields: list[str]
    conditions: list[_Condition]
    order_by: list[_Order]
    limit: int | None


_SOQL_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>'(?:[^'\\]|\\.)*')
    | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?(?:Z|[+-]\d{2}:?\d{2}))
    | (?P<number>-?\d+(?:\.\d+)?)
    | (?P<op>!=|<>|>=|<=|=|<|>)
    | (?P<punct>[(),])
    | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)
_STRING_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}


def _soql_tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _SOQL_TOKEN.match(text, position)
        if match is None or match.end() == position:
            bad = text[position:].strip().split(" ")[0]
            raise _malformed(f"unexpected token: '{bad}'")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class _SoqlParser:
    def __init__(self, text: str, schema: Callable[[str], dict[str, str] | None]) -> None:
        self.text = text
        self.tokens = _soql_tokens(text)
        self.position = 0
        self.schema = schema

    def peek_word(self) -> str | None:
        if self.position < len(self.tokens) and self.tokens[self.position][0] == "word":
            return self.tokens[self.position][1].upper()
        return None

    def next(self) -> tuple[str, str]:
        if self.position >= len(self.tokens):
            raise _malformed("unexpected token: '<EOF>'")
        token = self.tokens[self.position]
        self.position += 1
        return token

    def expect_word(self, keyword: str) -> None:
        kind, text = self.next()
        if kind != "word" or text.upper() != keyword:
            raise _malformed(f"unexpected token: '{text}'")

    def parse(self) -> SoqlQuery:
        self.expect_word("SELECT")
        raw_fields = [self.field_name()]
        while self.position < len(self.tokens) and self.tokens[self.position] == ("punct", ","):
            self.position += 1
            raw_fields.append(self.field_name())
        self.expect_word("FROM")
        kind, object_name = self.next()
        columns = self.schema(object_name) if kind == "word" else None
        if columns is None:
            raise SalesforceError(
                400,
                "INVALID_TYPE",
                f"\n{self.text}\n^\nERROR at Row:1:Column:1\nsObject type '{object_name}' is not "
                "supported. If you are attempting to use a custom object, be sure to append the "
                "'__c' after the entity name. Please reference your WSDL or the describe call for "
                "the appropriate names.",
            )
        canonical_object = next(o for o in OBJECT_PREFIXES if o.lower() == object_name.lower())
        fields = [self.column(columns, name, canonical_object) for name in raw_fields]
        conditions: list[_Condition] = []
        order_by: list[_Order] = []
        limit: int | None = None
        if self.peek_word() == "WHERE":
            self.position += 1
            conditions.append(self.condition(columns, canonical_object))
            while self.peek_word() in ("AND", "OR"):
                if self.peek_word() == "OR":
                    raise _malformed("the fake supports only AND between conditions")
                self.position += 1
                conditions.append(self.condition(columns, canonical_object))
        if self.peek_word() == "ORDER":
            self.position += 1
            self.expect_word("BY")
            order_by.append(self.order(columns, canonical_object))
            while self.position < len(self.tokens) and self.tokens[self.position] == ("punct", ","):
                self.position += 1
                order_by.append(self.order(columns, canonical_object))
        if self.peek_word() == "LIMIT":
            self.position += 1
            kind, text = self.next()
            if kind != "number" or not text.isdigit():
                raise _malformed(f"unexpected token: '{text}'")
            limit = int(text)
        if self.position < len(self.tokens):
            raise _malformed(f"unexpected token: '{self.tokens[self.position][1]}'")
        return SoqlQuery(canonical_object, fields, conditions, order_by, limit)

    def field_name(self) -> str:
        kind, text = self.next()
        if kind != "word" or text.upper() in ("FROM", "SELECT"):
            raise _malformed(f"unexpected token: '{text}'")
        return text

    def column(self, columns: Mapping[str, str], name: str, object_name: str) -> str:
        canonical = columns.get(name.lower())
        if canonical is None:
            raise SalesforceError(
                400,
                "INVALID_FIELD",
                f"\n{self.text}\n^\nERROR at Row:1:Column:1\nNo such column '{name}' on entity "
                f"'{object_name}'. If you are attempting to use a custom field, be sure to append "
                "the '__c' after the custom field name. Please reference your WSDL or the "
                "describe call for the appropriate names.",
            )
        return canonical

    def condition(self, columns: Mapping[str, str], object_name: str) -> _Condition:
        kind, name = self.next()
        if kind != "word":
            raise _malformed(f"unexpected token: '{name}'")
        column = self.column(columns, name, object_name)
        kind, op = self.next()
        if kind == "word" and op.upper() in ("IN", "NOT"):
            negated = op.upper() == "NOT"
            if negated:
                self.expect_word("IN")
            if self.next() != ("punct", "("):
                raise _malformed("unexpected token: expecting '('")
            values = [self.value(column)]
            while True:
                kind, text = self.next()
                if (kind, text) == ("punct", ")"):
                    break
                if (kind, text) != ("punct", ","):
                    raise _malformed(f"unexpected token: '{text}'")
                values.append(self.value(column))
            return _Condition(column, "NOTIN" if negated else "IN", values)
        if kind != "op":
            raise _malformed(f"unexpected token: '{op}'")
        return _Condition(column, "!=" if op == "<>" else op, self.value(column))

    def value(self, column: str) -> Any:
        kind, text = self.next()
        if kind == "word" and text.lower() == "null":
            return None
        expected = (
            "dateTime"
            if column in DATETIME_FIELDS
            else "boolean"
            if column in BOOLEAN_FIELDS
            else "string"
        )
        if kind == "string":
            value: Any = re.sub(
                r"\\(.)", lambda m: _STRING_ESCAPES.get(m.group(1), m.group(1)), text[1:-1]
            )
            if expected == "string":
                return value
        elif kind == "datetime":
            parsed = parse_datetime(text)
            if parsed is None:
                raise _malformed(f"line 1:0 no viable alternative at character '{text}'")
            if expected == "dateTime":
                return parsed
        elif kind == "word" and text.lower() in ("true", "false"):
            if expected == "boolean":
                return text.lower() == "true"
        elif kind == "number":
            if expected == "string" and column.endswith("__c"):
                return float(text) if "." in text else int(text)
        else:
            raise _malformed(f"unexpected token: '{text}'")
        quoting = (
            "should be enclosed in quotes"
            if expected == "string"
            else "should not be enclosed in quotes"
        )
        raise SalesforceError(
            400,
            "INVALID_QUERY_FILTER_OPERATOR",
            f"\n{self.text}\n^\nERROR at Row:1:Column:1\nvalue of filter criterion for field "
            f"'{column}' must be of type {expected} and {quoting}",
        )

    def order(self, columns: Mapping[str, str], object_name: str) -> _Order:
        kind, name = self.next()
        if kind != "word":
            raise _malformed(f"unexpected token: '{name}'")
        column = self.column(columns, name, object_name)
        descending = False
        if self.peek_word() in ("ASC", "DESC"):
            descending = self.next()[1].upper() == "DESC"
        # SOQL puts nulls first in ascending order and last in descending order by default.
        nulls_last = descending
        if self.peek_word() == "NULLS":
            self.position += 1
            kind, where = self.next()
            if where.upper() not in ("FIRST", "LAST"):
                raise _malformed(f"unexpected token: '{where}'")
            nulls_last = where.upper() == "LAST"
        return _Order(column, descending, nulls_last)


def _comparable(value: Any) -> Any:
    # SOQL compares text case-insensitively.
    return value.lower() if isinstance(value, str) else value


def _matches(record: Mapping[str, Any], condition: _Condition) -> bool:
    actual = record.get(condition.field)
    if condition.op in ("IN", "NOTIN"):
        if condition.field == "Id":
            found = actual in {id18(v) for v in condition.value if isinstance(v, str)}
        else:
            found = _comparable(actual) in {_comparable(v) for v in condition.value}
        return found == (condition.op == "IN")
    expected = condition.value
    if condition.field == "Id" and isinstance(expected, str):
        expected = id18(expected)
        left, right = actual, expected
    else:
        left, right = _comparable(actual), _comparable(expected)
    if condition.op == "=":
        return bool(left == right)
    if condition.op == "!=":
        return bool(left != right)
    if left is None or right is None:
        return False
    try:
        if condition.op == "<":
            return bool(left < right)
        if condition.op == "<=":
            return bool(left <= right)
        if condition.op == ">":
            return bool(left > right)
        return bool(left >= right)
    except TypeError:
        return False


# --------------------------------------------------------------------------- the fake


class SalesforceRequest(NamedTuple):
    """One request as it arrived and the status it was answered with.

    `body` is the parsed JSON body, the form of a token request, or None.
    """

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int


@dataclass
class _QueryCursor:
    object_name: str
    records: list[dict[str, Any]]
    batch_size: int


@dataclass
class _Answer:
    status: int
    payload: Any
    wrote: bool = False
    headers: dict[str, str] = field(default_factory=dict)


class FakeSalesforce:
    """The fake org's state, programming and what it has seen; safe to use from any thread."""

    def __init__(
        self,
        url: str,
        access_token: str = DEFAULT_TOKEN,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        refresh_token: str = DEFAULT_REFRESH_TOKEN,
    ) -> None:
        self.url = url
        self.initial_access_token = access_token
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every record, custom field, token refresh, request and programming."""
        with self._lock:
            self._valid_tokens: set[str] = {self.initial_access_token}
            self._access_token = self.initial_access_token
            self._custom_fields: dict[str, dict[str, bool]] = {o: {} for o in OBJECT_PREFIXES}
            self._records: dict[str, dict[str, Record]] = {o: {} for o in OBJECT_PREFIXES}
            self._email_index: dict[str, dict[str, dict[str, None]]] = {
                o: {} for o in OBJECT_PREFIXES
            }
            self._external_index: dict[str, dict[str, dict[str, str]]] = {
                o: {} for o in OBJECT_PREFIXES
            }
            self._cursors: dict[str, _QueryCursor] = {}
            self._next_number = 1
            self._next_cursor = 1
            self._log: list[tuple[SalesforceRequest, bool]] = []
            self._writes = 0
            self._failures: deque[int] = deque()
            self._concurrent_limited_next = 0
            self._rate_limit: int | None = None
            self._rate_window = 1.0
            self._accepted_at: deque[float] = deque()
            self._random_rate = 0.0
            self._random = random.Random(0)
            self._random_statuses: tuple[int, ...] = (500, 502, 503)
            self._latency = 0.0
            self._daily_limit = DEFAULT_DAILY_LIMIT
            self._api_usage = 0
            self._frozen_now: datetime | None = None

    # ------------------------------------------------------------------ programming

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next `n` API requests with `status`: 503 SERVER_UNAVAILABLE, any other
        status UNKNOWN_EXCEPTION, as Salesforce does."""
        with self._lock:
            self._failures.extend(status for _ in range(n))

    def rate_limit_next(self, n: int) -> None:
        """Refuse the next `n` API requests as Salesforce's concurrent-request limit does:
        403 `REQUEST_LIMIT_EXCEEDED` "ConcurrentPerOrgLongTxn Limit exceeded." (no 429)."""
        with self._lock:
            self._concurrent_limited_next += n

    def set_rate_limit(self, max_requests: int | None, window_seconds: float = 1.0) -> None:
        """Accept at most `max_requests` API requests in any moving `window_seconds`; refuse
        the others as `rate_limit_next` does. None turns it off (the default)."""
        with self._lock:
            self._rate_limit = max_requests
            self._rate_window = window_seconds
            self._accepted_at.clear()

    def random_failures(
        self, rate: float, seed: int = 0, statuses: Iterable[int] = (500, 502, 503)
    ) -> None:
        """Fail each API request with probability `rate` (0 turns it off), with a status
        drawn from `statuses`; reproducible for a given `seed`."""
        with self._lock:
            self._random_rate = rate
            self._random = random.Random(seed)
            self._random_statuses = tuple(statuses)

    def set_latency(self, seconds: float) -> None:
        """Wait `seconds` before handling each request."""
        with self._lock:
            self._latency = seconds

    def set_daily_limit(self, limit: int) -> None:
        """Refuse API requests beyond `limit` in the day (this fake's lifetime since reset)
        with 403 REQUEST_LIMIT_EXCEEDED "TotalRequests Limit exceeded."."""
        with self._lock:
            self._daily_limit = limit

    def set_now(self, now: datetime | None) -> None:
        """Stamp records written through the API with `now` (None: the real clock)."""
        with self._lock:
            self._frozen_now = None if now is None else _to_millis(now)

    def expire_token(self) -> None:
        """Invalidate every access token issued so far, as when the session times out."""
        with self._lock:
            self._valid_tokens.clear()

    @property
    def access_token(self) -> str:
        """The access token most recently issued (valid unless expired)."""
        with self._lock:
            return self._access_token

    @property
    def api_usage(self) -> int:
        with self._lock:
            return self._api_usage

    # ------------------------------------------------------------------ schema and records

    def add_field(self, object_name: str, api_name: str, *, external_id: bool = False) -> None:
        """Add the custom field `api_name` (ending `__c`) to `object_name`; with `external_id`
        it is unique (case-insensitively) and usable to upsert."""
        if not api_name.endswith("__c"):
            raise ValueError(f"custom field names end with __c: {api_name!r}")
        with self._lock:
            self._custom_fields[object_name][api_name] = external_id
            if external_id:
                index = self._external_index[object_name].setdefault(api_name, {})
                for record_id, record in self._records[object_name].items():
                    value = record.get(api_name)
                    if value not in (None, ""):
                        index[str(value).lower()] = record_id

    def add_record(
        self, object_name: str, fields: Mapping[str, Any], modstamp: datetime | None = None
    ) -> str:
        """Make a record exist, as if created in Salesforce at `modstamp` (default now).

        No validation: any field of the object may be given; returns the new Id.
        """
        with self._lock:
            values = self._canonical_fields(object_name, fields)
            stamp = _to_millis(modstamp) if modstamp is not None else self._now()
            record_id = self._new_id(object_name)
            record = self._blank_record(object_name, record_id, stamp)
            # Dates may be given, to seed history; the Id and Name are the fake's own.
            record.update({k: v for k, v in values.items() if k not in ("Id", "Name")})
            self._store(object_name, record_id, _with_name(record))
            return record_id

    def update_record(
        self,
        object_name: str,
        record_id: str,
        fields: Mapping[str, Any],
        modstamp: datetime | None = None,
    ) -> None:
        """Edit a record as a user would in Salesforce, at `modstamp` (default now)."""
        with self._lock:
            values = self._canonical_fields(object_name, fields)
            record_id = id18(record_id)
            record = dict(self._records[object_name][record_id])
            record.update({k: v for k, v in values.items() if k not in READ_ONLY_FIELDS})
            stamp = _to_millis(modstamp) if modstamp is not None else self._now()
            record["LastModifiedDate"] = record["SystemModstamp"] = stamp
            self._store(object_name, record_id, _with_name(record))

    def records(self, object_name: str) -> dict[str, dict[str, Any]]:
        """Every record of `object_name` by Id (a copy; dates are aware datetimes)."""
        with self._lock:
            return copy.deepcopy(self._records[object_name])

    def record_by(self, object_name: str, field_name: str, value: Any) -> dict[str, Any] | None:
        """The first record whose `field_name` equals `value` (text case-insensitively)."""
        with self._lock:
            store = self._records[object_name]
            if field_name == "Id":
                found = store.get(id18(str(value)))
                return copy.deepcopy(found) if found else None
            if field_name == "Email" and isinstance(value, str):
                ids = self._email_index[object_name].get(value.lower(), {})
                return copy.deepcopy(store[next(iter(ids))]) if ids else None
            index = self._external_index[object_name].get(field_name)
            if index is not None and isinstance(value, str):
                record_id = index.get(value.lower())
                return copy.deepcopy(store[record_id]) if record_id else None
            for record in store.values():
                if _comparable(record.get(field_name)) == _comparable(value):
                    return copy.deepcopy(record)
            return None

    # ------------------------------------------------------------------ inspection

    @property
    def requests(self) -> list[SalesforceRequest]:
        """Every request so far, in the order answered, whatever it was answered."""
        with self._lock:
            return [request for request, _ in self._log]

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        """Requests that reached an endpoint (not refused by the token check, a limit or a
        programmed failure) with `method` (any if None) to a path starting `path_prefix`."""
        with self._lock:
            return sum(
                1
                for request, reached in self._log
                if reached and _selected(request, method, path_prefix)
            )

    def count_all(self, method: str | None = None, path_prefix: str = "") -> int:
        """Every request received with `method` to a path starting `path_prefix`."""
        with self._lock:
            return sum(1 for request, _ in self._log if _selected(request, method, path_prefix))

    def writes(self) -> int:
        """Write requests (create, update or upsert) that saved at least one record."""
        with self._lock:
            return self._writes

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        method = request.method
        path = request.url.path
        raw_body = await request.body()
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        headers = {name.lower(): value for name, value in request.headers.items()}
        with self._lock:
            latency = self._latency
        if latency > 0:
            await asyncio.sleep(latency)
        body: Any = None
        reached = False
        if path == TOKEN_PATH:
            form = dict(parse_qsl(raw_body.decode("latin-1"), keep_blank_values=True))
            body = form
            reached = True
            answer = self._token(method, form)
            extra: dict[str, str] = {}
        else:
            extra = {}
            bad_json: SalesforceError | None = None
            try:
                body = _json_body(raw_body)
            except SalesforceError as error:
                body, bad_json = raw_body.decode("utf-8", "replace"), error
            try:
                self._authenticate(headers)
                self._admit()
                with self._lock:
                    extra["sforce-limit-info"] = self._limit_info()
                reached = True
                if bad_json is not None:
                    raise bad_json
                answer = self._route(method, path, query, body, headers)
            except SalesforceError as error:
                answer = _Answer(error.status, error.body())
        content = b"" if answer.status == 204 else json.dumps(answer.payload).encode()
        with self._lock:
            self._log.append((SalesforceRequest(method, path, query, body, answer.status), reached))
            if answer.wrote:
                self._writes += 1
        response = Response(
            content=content,
            status_code=answer.status,
            media_type=None if answer.status == 204 else "application/json;charset=UTF-8",
            headers={**extra, **answer.headers},
        )
        await response(scope, receive, send)

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        with self._lock:
            valid = scheme.lower() in ("bearer", "oauth") and token.strip() in self._valid_tokens
        if not valid:
            raise SalesforceError(401, "INVALID_SESSION_ID", "Session expired or invalid")

    def _admit(self) -> None:
        """Raise the error for an authenticated request that must not reach an endpoint."""
        with self._lock:
            if self._failures:
                raise _unknown_error(self._failures.popleft())
            if self._concurrent_limited_next > 0:
                self._concurrent_limited_next -= 1
                raise _concurrent_limit()
            if self._rate_limit is not None:
                now = time.monotonic()
                while self._accepted_at and self._accepted_at[0] <= now - self._rate_window:
                    self._accepted_at.popleft()
                if len(self._accepted_at) >= self._rate_limit:
                    raise _concurrent_limit()
                self._accepted_at.append(now)
            if self._random_rate > 0 and self._random.random() < self._random_rate:
                raise _unknown_error(self._random.choice(self._random_statuses))
            if self._api_usage >= self._daily_limit:
                raise SalesforceError(
                    403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."
                )
            self._api_usage += 1

    def _limit_info(self) -> str:
        return f"api-usage={self._api_usage}/{self._daily_limit}"

    # ------------------------------------------------------------------ OAuth

    def _token(self, method: str, form: Mapping[str, str]) -> _Answer:
        if method != "POST":
            return _Answer(
                400, {"error": "invalid_request", "error_description": "must use HTTP POST"}
            )
        try:
            if form.get("grant_type") != "refresh_token":
                raise _OAuthError("unsupported_grant_type", "grant type not supported")
            # Salesforce's own answers for a wrong consumer key and a wrong secret.
            if form.get("client_id") != self.client_id:
                raise _OAuthError("invalid_client_id", "client identifier invalid")
            if "client_secret" in form and form["client_secret"] != self.client_secret:
                raise _OAuthError("invalid_client", "invalid client credentials")
            if form.get("refresh_token") != self.refresh_token:
                raise _OAuthError("invalid_grant", "expired access/refresh token")
        except _OAuthError as error:
            return _Answer(400, {"error": error.error, "error_description": error.description})
        token = f"{ORG_ID[:15]}!AQ0AQ{secrets.token_urlsafe(60)}"
        with self._lock:
            # Salesforce leaves earlier sessions valid until they time out (`expire_token`).
            self._valid_tokens.add(token)
            self._access_token = token
        identity = f"https://login.salesforce.com/id/{ORG_ID}/{INTEGRATION_USER_ID}"
        issued_at = str(int(time.time() * 1000))
        signature = base64.b64encode(
            hmac.new(
                self.client_secret.encode(), (identity + issued_at).encode(), hashlib.sha256
            ).digest()
        ).decode()
        return _Answer(
            200,
            {
                "access_token": token,
                "signature": signature,
                "scope": "refresh_token api",
                "instance_url": self.url,
                "id": identity,
                "token_type": "Bearer",
                "issued_at": issued_at,
            },
        )

    # ------------------------------------------------------------------ routing

    def _route(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: Any,
        headers: Mapping[str, str],
    ) -> _Answer:
        if not path.startswith(DATA_PATH + "/"):
            raise _not_found()
        parts = path[len(DATA_PATH) + 1 :].strip("/").split("/")
        match method, parts:
            case "GET", ["query"]:
                return self._query(query.get("q"), headers)
            case "GET", ["query", locator]:
                return self._query_more(locator, headers)
            case "GET", ["limits"]:
                with self._lock:
                    used, limit = self._api_usage, self._daily_limit
                return _Answer(200, {"DailyApiRequests": {"Max": limit, "Remaining": limit - used}})
            case "POST", ["composite", "sobjects"]:
                return self._collection(body, mode="create")
            case "PATCH", ["composite", "sobjects"]:
                return self._collection(body, mode="update")
            case "PATCH", ["composite", "sobjects", object_name, external_field]:
                return self._upsert(object_name, external_field, body)
            case "GET", ["sobjects", object_name, record_id]:
                return self._get_record(object_name, record_id, query.get("fields"))
            case "PATCH", ["sobjects", object_name, record_id]:
                return self._patch_record(object_name, record_id, body)
            case _, ["composite", "sobjects", *_] | ["sobjects", _, _] | ["query", *_]:
                raise SalesforceError(
                    405, "METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed."
                )
        raise _not_found()

    # ------------------------------------------------------------------ single records

    def _get_record(self, object_name: str, record_id: str, fields: str | None) -> _Answer:
        with self._lock:
            columns = self._columns(object_name)
            if columns is None:
                raise _not_found()
            record = self._records[object_name].get(id18(record_id))
            if record is None:
                raise _not_found()
            if fields:
                names = []
                for name in fields.split(","):
                    canonical = columns.get(name.strip().lower())
                    if canonical is None:
                        raise SalesforceError(
                            400,
                            "INVALID_FIELD",
                            f"No such column '{name.strip()}' on sobject of type {object_name}",
                        )
                    names.append(canonical)
            else:
                names = list(columns.values())
            return _Answer(200, _rendered(object_name, record, names))

    def _patch_record(self, object_name: str, record_id: str, body: Any) -> _Answer:
        if not isinstance(body, dict):
            raise SalesforceError(400, "JSON_PARSER_ERROR", "The request body must be an object")
        with self._lock:
            if self._columns(object_name) is None:
                raise _not_found()
            values = self._body_fields(object_name, body, allow_id=False)
            record_id = id18(record_id)
            existing = self._records[object_name].get(record_id)
            if existing is None:
                raise _not_found()
            errors = self._validate(object_name, values, existing, record_id)
            if errors:
                first = errors[0]
                raise SalesforceError(
                    400, first.status_code, first.message, fields=list(first.fields)
                )
            self._save(object_name, record_id, values, self._now())
        return _Answer(204, None, wrote=True)

    # ------------------------------------------------------------------ sObject Collections

    def _collection_body(self, body: Any) -> tuple[bool, list[Any]]:
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            raise SalesforceError(400, "JSON_PARSER_ERROR", "Expected a body with a 'records' list")
        records = body["records"]
        if len(records) > MAX_COLLECTION_RECORDS:
            raise SalesforceError(
                400,
                "EXCEEDED_ID_LIMIT",
                "record limit reached. cannot submit more than 200 records into this call",
            )
        return bool(body.get("allOrNone", False)), records

    def _record_type(self, raw: Any, expected: str | None = None) -> str:
        if not isinstance(raw, dict):
            raise SalesforceError(400, "JSON_PARSER_ERROR", "Each record must be an object")
        attributes = raw.get("attributes")
        object_name = attributes.get("type") if isinstance(attributes, dict) else None
        if not isinstance(object_name, str):
            raise SalesforceError(
                400,
                "INVALID_TYPE",
                "Must send a concrete entity type. Each record needs attributes with a type.",
            )
        if object_name not in OBJECT_PREFIXES:
            raise SalesforceError(
                400, "INVALID_TYPE", f"sObject type '{object_name}' is not supported."
            )
        if expected is not None and object_name != expected:
            raise SalesforceError(
                400,
                "INVALID_TYPE",
                f"Record of type '{object_name}' can't be upserted into '{expected}'.",
            )
        return object_name

    def _collection(self, body: Any, *, mode: str) -> _Answer:
        all_or_none, raw_records = self._collection_body(body)
        with self._lock:
            # Unknown fields refuse the whole request before any record is saved.
            prepared = []
            for raw in raw_records:
                object_name = self._record_type(raw)
                prepared.append(
                    (object_name, self._body_fields(object_name, raw, allow_id=mode == "update"))
                )
            now = self._now()
            undo: list[tuple[str, str, Record | None]] = []
            results: list[dict[str, Any]] = []
            for object_name, values in prepared:
                if mode == "create":
                    result = self._create_one(object_name, values, now, undo)
                else:
                    result = self._update_one(object_name, values, now, undo)
                results.append(result)
            return self._finish(results, undo, all_or_none)

    def _upsert(self, object_name: str, external_field: str, body: Any) -> _Answer:
        all_or_none, raw_records = self._collection_body(body)
        with self._lock:
            columns = self._columns(object_name)
            if columns is None:
                raise _not_found()
            key = columns.get(external_field.lower())
            # In practice Salesforce answers a field that doesn't exist with 404 NOT_FOUND and
            # one that exists but isn't an external id (nor idLookup) with 400 INVALID_FIELD.
            if key is None:
                raise SalesforceError(
                    404,
                    "NOT_FOUND",
                    f"Provided external ID field does not exist or is not accessible: "
                    f"{external_field}",
                )
            if key not in ID_LOOKUP_FIELDS and not self._custom_fields[object_name].get(key):
                raise SalesforceError(
                    400,
                    "INVALID_FIELD",
                    f"Field name provided, {key} does not match an External ID, Salesforce Id, "
                    f"or indexed field for {object_name}",
                )
            prepared = []
            for raw in raw_records:
                self._record_type(raw, object_name)
                prepared.append(self._body_fields(object_name, raw, allow_id=False))
            keys_seen: dict[str, int] = {}
            for values in prepared:
                value = values.get(key)
                if value not in (None, ""):
                    lowered = str(value).lower()
                    keys_seen[lowered] = keys_seen.get(lowered, 0) + 1
            now = self._now()
            undo: list[tuple[str, str, Record | None]] = []
            results: list[dict[str, Any]] = []
            for values in prepared:
                value = values.get(key)
                if value in (None, ""):
                    results.append(
                        _failed([RecordError("MISSING_ARGUMENT", f"{key} not specified")])
                    )
                    continue
                if keys_seen[str(value).lower()] > 1:
                    results.append(
                        _failed(
                            [
                                RecordError(
                                    "DUPLICATE_EXTERNAL_ID",
                                    f"Duplicate external id specified: {value}",
                                    [key],
                                )
                            ]
                        )
                    )
                    continue
                matches = self._lookup(object_name, key, str(value))
                if len(matches) > 1:
                    results.append(
                        _failed(
                            [
                                RecordError(
                                    "DUPLICATE_EXTERNAL_ID",
                                    f"{key}: more than one record found for external id field: "
                                    f"[{', '.join(matches)}]",
                                )
                            ]
                        )
                    )
                elif matches:
                    result = self._update_one(object_name, {**values, "Id": matches[0]}, now, undo)
                    if result["success"]:
                        result["created"] = False
                    results.append(result)
                else:
                    result = self._create_one(object_name, values, now, undo)
                    if result["success"]:
                        result["created"] = True
                    results.append(result)
            return self._finish(results, undo, all_or_none)

    def _finish(
        self,
        results: list[dict[str, Any]],
        undo: list[tuple[str, str, Record | None]],
        all_or_none: bool,
    ) -> _Answer:
        if all_or_none and any(not result["success"] for result in results):
            for object_name, record_id, previous in reversed(undo):
                if previous is None:
                    self._remove(object_name, record_id)
                else:
                    self._store(object_name, record_id, previous)
            results = [
                result if not result["success"] else _failed([ROLLED_BACK]) for result in results
            ]
            return _Answer(200, results)
        return _Answer(200, results, wrote=any(result["success"] for result in results))

    def _create_one(
        self,
        object_name: str,
        values: Record,
        now: datetime,
        undo: list[tuple[str, str, Record | None]],
    ) -> dict[str, Any]:
        errors = self._validate(object_name, values, None, None)
        if errors:
            return _failed(errors)
        record_id = self._new_id(object_name)
        record = self._blank_record(object_name, record_id, now)
        record["OwnerId"] = INTEGRATION_USER_ID
        if object_name == "Lead":
            record["Status"] = LEAD_STATUSES[0]
        record.update(values)
        self._store(object_name, record_id, _with_name(record))
        undo.append((object_name, record_id, None))
        return {"id": record_id, "success": True, "errors": []}

    def _update_one(
        self,
        object_name: str,
        values: Record,
        now: datetime,
        undo: list[tuple[str, str, Record | None]],
    ) -> dict[str, Any]:
        values = dict(values)
        raw_id = values.pop("Id", None)
        if not isinstance(raw_id, str) or not raw_id:
            return _failed([RecordError("MISSING_ARGUMENT", "Id not specified in an update call")])
        record_id = id18(raw_id)
        existing = self._records[object_name].get(record_id)
        if existing is None or not record_id.startswith(OBJECT_PREFIXES[object_name]):
            if len(record_id) != 18:
                return _failed(
                    [
                        RecordError(
                            "MALFORMED_ID", f"Id: id value of incorrect type: {raw_id}", ["Id"]
                        )
                    ]
                )
            return _failed([RecordError("ENTITY_IS_DELETED", "entity is deleted")])
        errors = self._validate(object_name, values, existing, record_id)
        if errors:
            return _failed(errors)
        undo.append((object_name, record_id, existing))
        self._save(object_name, record_id, values, now)
        return {"id": record_id, "success": True, "errors": []}

    # ------------------------------------------------------------------ validation

    def _validate(
        self,
        object_name: str,
        values: Record,
        existing: Record | None,
        record_id: str | None,
    ) -> list[RecordError]:
        errors: list[RecordError] = []
        read_only = [name for name in values if name in READ_ONLY_FIELDS]
        if read_only:
            action = "create" if existing is None else "update"
            errors.append(
                RecordError(
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    f"Unable to {action} fields: {read_only}. Please check the security settings "
                    "of this field and verify that it is read/write for your profile or "
                    "permission set.",
                    read_only,
                )
            )
        merged = {**(existing or {}), **values}
        missing = [name for name in REQUIRED_FIELDS[object_name] if merged.get(name) in (None, "")]
        if missing:
            errors.append(
                RecordError(
                    "REQUIRED_FIELD_MISSING",
                    f"Required fields are missing: [{', '.join(missing)}]",
                    missing,
                )
            )
        email = values.get("Email")
        if email not in (None, "") and (
            not isinstance(email, str) or not EMAIL_PATTERN.match(email)
        ):
            errors.append(
                RecordError(
                    "INVALID_EMAIL_ADDRESS", f"Email: invalid email address: {email}", ["Email"]
                )
            )
        if object_name == "Lead" and "Status" in values and values["Status"] not in LEAD_STATUSES:
            errors.append(
                RecordError(
                    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                    f"Status: bad value for restricted picklist field: {values['Status']}",
                    ["Status"],
                )
            )
        for name, value in values.items():
            limit = MAX_LENGTHS.get(name) or (
                CUSTOM_FIELD_MAX_LENGTH if name.endswith("__c") else None
            )
            if limit is not None and isinstance(value, str) and len(value) > limit:
                errors.append(
                    RecordError(
                        "STRING_TOO_LONG",
                        f"{name}: data value too large: {value[:20]}... (max length={limit})",
                        [name],
                    )
                )
        for name, is_external in self._custom_fields[object_name].items():
            value = values.get(name)
            if not is_external or value in (None, ""):
                continue
            holder = self._external_index[object_name][name].get(str(value).lower())
            if holder is not None and holder != record_id:
                errors.append(
                    RecordError(
                        "DUPLICATE_VALUE",
                        f"duplicate value found: {name} duplicates value on record with id: "
                        f"{holder}",
                        [],
                    )
                )
        return errors

    # ------------------------------------------------------------------ queries

    def _query(self, soql: str | None, headers: Mapping[str, str]) -> _Answer:
        if not soql:
            raise _malformed("A query string has to be specified")
        with self._lock:
            parsed = _SoqlParser(soql, self._columns).parse()
            store = self._records[parsed.object_name]
            candidates = self._candidates(parsed)
            matching = [
                store[record_id]
                for record_id in candidates
                if record_id in store
                and all(_matches(store[record_id], c) for c in parsed.conditions)
            ]
            for order in reversed(parsed.order_by):
                present = [r for r in matching if r.get(order.field) is not None]
                absent = [r for r in matching if r.get(order.field) is None]
                present.sort(key=_sort_key(order.field), reverse=order.descending)
                matching = present + absent if order.nulls_last else absent + present
            if parsed.limit is not None:
                matching = matching[: parsed.limit]
            rendered = [_rendered(parsed.object_name, r, parsed.fields) for r in matching]
            cursor = _QueryCursor(parsed.object_name, rendered, _batch_size(headers))
            locator = f"01gRO{_base62(self._next_cursor, 10)}"
            self._next_cursor += 1
            return _Answer(200, self._page(locator, cursor, 0))

    def _query_more(self, locator_and_offset: str, headers: Mapping[str, str]) -> _Answer:
        locator, _, offset_text = locator_and_offset.rpartition("-")
        with self._lock:
            cursor = self._cursors.get(locator)
            if cursor is None or not offset_text.isdigit():
                raise SalesforceError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
            if "sforce-query-options" in headers:
                cursor.batch_size = _batch_size(headers)
            return _Answer(200, self._page(locator, cursor, int(offset_text)))

    def _page(self, locator: str, cursor: _QueryCursor, offset: int) -> dict[str, Any]:
        end = offset + cursor.batch_size
        page: dict[str, Any] = {
            "totalSize": len(cursor.records),
            "done": end >= len(cursor.records),
        }
        if end < len(cursor.records):
            self._cursors[locator] = cursor
            page["nextRecordsUrl"] = f"{DATA_PATH}/query/{locator}-{end}"
        else:
            self._cursors.pop(locator, None)
        page["records"] = copy.deepcopy(cursor.records[offset:end])
        return page

    def _candidates(self, parsed: SoqlQuery) -> Iterable[str]:
        """Ids to test: from an index when a condition allows, else every record."""
        object_name = parsed.object_name
        for condition in parsed.conditions:
            if condition.op not in ("=", "IN"):
                continue
            values = condition.value if condition.op == "IN" else [condition.value]
            if not all(isinstance(v, str) for v in values):
                continue
            if condition.field == "Id":
                return list(dict.fromkeys(id18(v) for v in values))
            if condition.field == "Email" or condition.field in self._external_index[object_name]:
                # Without ORDER BY, Salesforce promises no order either.
                found: dict[str, None] = {}
                for value in values:
                    found.update(dict.fromkeys(self._lookup(object_name, condition.field, value)))
                return list(found)
        return list(self._records[object_name])

    # ------------------------------------------------------------------ storage (lock held)

    def _now(self) -> datetime:
        return self._frozen_now or _to_millis(datetime.now(UTC))

    def _new_id(self, object_name: str) -> str:
        number = self._next_number
        self._next_number += 1
        return id18(f"{OBJECT_PREFIXES[object_name]}RO{_base62(number, 10)}")

    def _columns(self, object_name: str) -> dict[str, str] | None:
        """Lower-cased name -> API name of every field of `object_name` (any case)."""
        canonical = next((o for o in OBJECT_PREFIXES if o.lower() == object_name.lower()), None)
        if canonical is None:
            return None
        names = [*STANDARD_FIELDS[canonical], *self._custom_fields[canonical]]
        return {name.lower(): name for name in names}

    def _canonical_fields(self, object_name: str, fields: Mapping[str, Any]) -> Record:
        columns = self._columns(object_name)
        if columns is None:
            raise KeyError(object_name)
        values: Record = {}
        for name, value in fields.items():
            canonical = columns.get(name.lower())
            if canonical is None:
                raise KeyError(f"no field {name} on {object_name}")
            values[canonical] = _to_millis(value) if isinstance(value, datetime) else value
        return values

    def _body_fields(self, object_name: str, raw: Mapping[str, Any], *, allow_id: bool) -> Record:
        columns = self._columns(object_name)
        assert columns is not None
        values: Record = {}
        for name, value in raw.items():
            if name == "attributes":
                continue
            canonical = columns.get(name.lower())
            if canonical is None:
                raise SalesforceError(
                    400,
                    "INVALID_FIELD",
                    f"No such column '{name}' on sobject of type {object_name}",
                )
            if isinstance(value, dict | list):
                raise SalesforceError(
                    400,
                    "JSON_PARSER_ERROR",
                    f"Cannot deserialize instance of {canonical} from {type(value).__name__}",
                )
            if canonical == "Id" and allow_id:
                values["Id"] = value
                continue
            # Salesforce stores an empty text as null.
            values[canonical] = None if value == "" else value
        return values

    def _blank_record(self, object_name: str, record_id: str, stamp: datetime) -> Record:
        columns = self._columns(object_name) or {}
        record: Record = dict.fromkeys(columns.values())
        record.update(
            {
                "Id": record_id,
                "CreatedDate": stamp,
                "LastModifiedDate": stamp,
                "SystemModstamp": stamp,
                "IsDeleted": False,
            }
        )
        return record

    def _save(self, object_name: str, record_id: str, values: Record, now: datetime) -> None:
        record = {**self._records[object_name][record_id], **values}
        # Salesforce stamps every saved update, even one that changes no value.
        record["LastModifiedDate"] = record["SystemModstamp"] = now
        self._store(object_name, record_id, _with_name(record))

    def _lookup(self, object_name: str, field_name: str, value: str) -> list[str]:
        if field_name == "Email":
            return list(self._email_index[object_name].get(value.lower(), {}))
        record_id = self._external_index[object_name].get(field_name, {}).get(value.lower())
        return [record_id] if record_id else []

    def _store(self, object_name: str, record_id: str, record: Record) -> None:
        self._unindex(object_name, record_id)
        self._records[object_name][record_id] = record
        email = record.get("Email")
        if isinstance(email, str) and email:
            self._email_index[object_name].setdefault(email.lower(), {})[record_id] = None
        for name, index in self._external_index[object_name].items():
            value = record.get(name)
            if value not in (None, ""):
                index[str(value).lower()] = record_id

    def _remove(self, object_name: str, record_id: str) -> None:
        self._unindex(object_name, record_id)
        del self._records[object_name][record_id]

    def _unindex(self, object_name: str, record_id: str) -> None:
        previous = self._records[object_name].get(record_id)
        if previous is None:
            return
        email = previous.get("Email")
        if isinstance(email, str) and email:
            holders = self._email_index[object_name].get(email.lower(), {})
            holders.pop(record_id, None)
            if not holders:
                self._email_index[object_name].pop(email.lower(), None)
        for name, index in self._external_index[object_name].items():
            value = previous.get(name)
            if value not in (None, "") and index.get(str(value).lower()) == record_id:
                del index[str(value).lower()]


# --------------------------------------------------------------------------- helpers


def _json_body(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise SalesforceError(
            400,
            "JSON_PARSER_ERROR",
            f"Unexpected character: {error.msg} at [line:{error.lineno}, column:{error.colno}]",
        ) from None


def _batch_size(headers: Mapping[str, str]) -> int:
    # Salesforce reads `batchSize=N` and keeps it within 200..2000.
    match = re.search(r"batchSize\s*=\s*(\d+)", headers.get("sforce-query-options", ""))
    if match is None:
        return DEFAULT_QUERY_BATCH
    return max(MIN_QUERY_BATCH, min(DEFAULT_QUERY_BATCH, int(match.group(1))))


def _sort_key(field_name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda record: _comparable(record[field_name])


def _failed(errors: list[RecordError]) -> dict[str, Any]:
    return {"success": False, "errors": [error.as_json() for error in errors]}


def _with_name(record: Record) -> Record:
    parts = [record.get("FirstName"), record.get("LastName")]
    record["Name"] = " ".join(p for p in parts if isinstance(p, str) and p) or None
    return record


def _rendered(object_name: str, record: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    rendered: dict[str, Any] = {
        "attributes": {
            "type": object_name,
            "url": f"{DATA_PATH}/sobjects/{object_name}/{record['Id']}",
        }
    }
    for name in names:
        value = record.get(name)
        rendered[name] = format_datetime(value) if isinstance(value, datetime) else value
    return rendered


def _selected(request: SalesforceRequest, method: str | None, path_prefix: str) -> bool:
    return (method is None or request.method == method.upper()) and request.path.startswith(
        path_prefix
    )


@asynccontextmanager
async def running_fake_salesforce(
    access_token: str = DEFAULT_TOKEN,
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: str = DEFAULT_CLIENT_SECRET,
    refresh_token: str = DEFAULT_REFRESH_TOKEN,
) -> AsyncIterator[FakeSalesforce]:
    """Serve a fresh `FakeSalesforce` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakeSalesforce(base_url, access_token, client_id, client_secret, refresh_token)
    async with serving_in_thread(
        fake, sock, name="fake-salesforce", lifespan="off", graceful_shutdown=1
    ):
        yield fake
