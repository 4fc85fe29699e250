"""The delivery loop: outbox events become deliveries, deliveries become signed POSTs.

Three steps, each its own short transaction, so no HTTP request ever runs inside one:

1. **Fan-out.** Committed events not yet dispatched, in commit order, become one delivery
   per matching endpoint; the events are marked dispatched in the same transaction. One
   worker at a time fans out (an advisory lock on PostgreSQL, the write lock on SQLite), so
   deliveries are created in commit order.
2. **Claim.** Due deliveries are leased to this worker (`FOR UPDATE SKIP LOCKED` on
   PostgreSQL): `next_attempt_at` becomes the end of the lease, so a delivery whose worker
   died is due again when the lease runs out. Each endpoint gets at most its share of the
   worker's slots, so one slow endpoint never holds the others up; an ordered endpoint gets
   one delivery at a time, always its oldest unfinished one.
3. **Send and record.** Each claimed delivery is POSTed with the Standard Webhooks headers;
   the results are written in batches: an attempt row each, the delivery's new state (only
   while this worker still holds its lease) and the endpoint's health.

An endpoint has up to its cap of slots sending at once. A slot is a task with a connection
of its own: when its send finishes it goes straight on to the endpoint's next delivery
claimed ahead, and asks for a claim when what is claimed ahead runs low, so the slots stay
busy while claims and records run in their own transactions, a batch at a time. Fan-out
runs in a task of its own too: a large backlog of events does not hold claims up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx
import structlog
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Insert,
    Integer,
    Select,
    String,
    Table,
    Text,
    Update,
    any_,
    bindparam,
    func,
    insert,
    literal,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.events.catalog import WebhookTest
from memberhub.events.models import Event
from memberhub.events.sequencer import PASS_LIMIT, sequence_pending, set_dispatch_wanted
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox, SecretUnreadable
from memberhub.kit.db import Database, array_rows
from memberhub.kit.errors import ServiceUnavailable
from memberhub.kit.ids import new_public_id, new_public_ids
from memberhub.ops.metrics import Metrics
from memberhub.ops.tracing import work_span
from memberhub.organisations.repository import OrganisationRepository
from memberhub.settings import Settings
from memberhub.webhooks import service
from memberhub.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from memberhub.webhooks.signing import TypeMatcher, signature_header
from memberhub.webhooks.ssrf import DestinationRefused, UrlPolicy, guarded_transport

if TYPE_CHECKING:
    from memberhub.ops.tracing import Tracing

log = structlog.get_logger("memberhub.webhooks")

FAN_OUT_BATCH = 1000
# A backlog is fanned out in batches growing from this size (doubling up to FAN_OUT_BATCH):
# the first deliveries are sent while the next batches are written, instead of waiting
# for the whole first batch (a thousand events for ten endpoints take PostgreSQL a few
# hundred milliseconds to insert).
FAN_OUT_FIRST_BATCH = 64
# Sends go on from what was claimed ahead while results wait to be recorded together: up to
# this long after the first result of a batch, while sends are in flight, unless
# RECORD_BATCH_TARGET results are waiting sooner. A transaction per batch costs about as much
# CPU whatever its size, so a busy loop records few, large batches.
RECORD_GATHER_SECONDS = 0.1
RECORD_BATCH_TARGET = 128
FAILING_ENDPOINT_CONCURRENCY = 2
RECORD_RETRY_DELAYS = (0.2, 1.0, 3.0)
# How long a worker trusts its copy of the endpoints (URL, secrets, ordering, rate limit).
ENDPOINT_REFRESH_SECONDS = 1.0
# How often a busy loop looks for events to fan out (each look costs about as much CPU
# whatever it finds: fewer, larger batches).
FAN_OUT_CHECK_SECONDS = 0.1
# Claimed ahead for a healthy endpoint: what it takes in about this long at the pace of its
# recent sends, at least its cap and at most AHEAD_MAX_CAPS times it.
AHEAD_SECONDS = 0.25
AHEAD_MAX_CAPS = 7
# Weight of the latest send in an endpoint's running mean send time.
SEND_TIME_WEIGHT = 0.2
# A delivery claimed ahead is sent only if its lease outlasts a whole attempt by this much
# (the lease is at least the timeout plus 5 s, so a fresh claim has room to wait).
LEASE_MARGIN_SECONDS = 2.0
RESPONSE_BODY_LIMIT = 2048
# Events whose bodies a loop keeps for their other endpoints' claims (at most one claim's
# worth, AHEAD_MAX_CAPS + 1 times the worker's concurrency, is in use at a time).
BODIES_KEPT = 4096
# ... and for at most this long: what a later claim sends is at most this old.
BODIES_KEPT_SECONDS = 1.0
# Sent with every delivery, besides its Standard Webhooks headers.
_REQUEST_HEADERS = {
    "user-agent": "memberhub-webhooks/1",
    # Only the first 2 KB of the answer is kept: no need to have it compressed.
    "accept-encoding": "identity",
    "content-type": "application/json",
}
JITTER = 0.2
# Statuses after which a receiver's Retry-After decides when to try again.
RETRY_AFTER_STATUSES = frozenset({429, 502, 503, 504})
# An arbitrary constant naming the advisory lock held by the one worker fanning out.
_FAN_OUT_LOCK = 7_320_114_101
# Events a change to an endpoint fans out first, at most (`fan_out_before_change`).
CHANGE_FAN_OUT_LIMIT = 50 * FAN_OUT_BATCH
# Core tables: the loop's statements need none of the ORM's bookkeeping.
_DELIVERIES = cast(Table, WebhookDelivery.__table__)
_ATTEMPTS = cast(Table, WebhookAttempt.__table__)
_ENDPOINTS = cast(Table, WebhookEndpoint.__table__)
_EVENTS = cast(Table, Event.__table__)

# Events numbered while no endpoint is enabled are marked dispatched as they are numbered:
# fan-out would find no endpoint for them and only mark them so, one row write each again.
# (Creating an endpoint holds the sequencer until it commits; see `create_endpoint`.)
set_dispatch_wanted(select(_ENDPOINTS.c.id).where(_ENDPOINTS.c.enabled.is_(True)).exists())

_Statement = TypeVar("_Statement")


def _id_in(column: ColumnElement[int], name: str, *, postgres: bool) -> ColumnElement[bool]:
    """`column` is one of the ids bound to `name`. On PostgreSQL as one array parameter
    (`= ANY($1)`): an `IN` list is rendered again for each length, one placeholder per id,
    and prepared anew by the server for each length seen."""
    if postgres:
        return column == any_(bindparam(name, type_=ARRAY(BigInteger)))
    return column.in_(bindparam(name, expanding=True))


def _for_each_backend(build: Callable[[bool], _Statement]) -> dict[bool, _Statement]:
    """A statement built once for PostgreSQL (`True`) and once for SQLite (`False`)."""
    return {postgres: build(postgres) for postgres in (False, True)}


@dataclass(frozen=True)
class DeliveryConfig:
    schedule: tuple[float, ...]
    timeout: float
    max_payload_bytes: int
    max_retry_after: float
    disable_after: float
    concurrency: int
    endpoint_concurrency: int
    lease: float
    poll: float
    policy: UrlPolicy

    @property
    def longest_quiet(self) -> float:
        """The longest an endpoint that keeps failing goes without an attempt: the longest
        retry delay with its jitter, or the longest Retry-After honoured."""
        return max(max(self.schedule, default=0.0) * (1 + JITTER), self.max_retry_after)

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryConfig:
        return cls(
            schedule=settings.webhook_retry_delays,
            timeout=settings.webhook_timeout_seconds,
            max_payload_bytes=settings.webhook_max_payload_bytes,
            max_retry_after=settings.webhook_max_retry_after_seconds,
            disable_after=settings.webhook_disable_after_seconds,
            concurrency=settings.webhook_concurrency,
            endpoint_concurrency=settings.webhook_endpoint_concurrency,
            lease=max(settings.webhook_lease_seconds, settings.webhook_timeout_seconds + 5),
            poll=settings.webhook_poll_seconds,
            policy=UrlPolicy.from_settings(settings),
        )


# ---------------------------------------------------------------- fan-out


async def fan_out_before_change(session: AsyncSession, now: datetime) -> None:
    """Before a change to which events an endpoint receives (enabling or disabling it, its
    types, its organisation): fan out every event committed so far, to the endpoints as they
    stand, so that an event goes where the endpoints stood when it was committed, however
    far behind the worker is. Numbering is then held until the change commits (as when an
    endpoint is created), so every later event meets the endpoint as changed.

    Refused (503, to retry) when more than `CHANGE_FAN_OUT_LIMIT` events wait: the worker
    is far behind, and the change would wait for all of them."""
    await sequence_pending(session)
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:
        # Waited for: a fan-out running now finishes first.
        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _FAN_OUT_LOCK})
    waiting = (await session.scalar(_WAITING_EVENTS) or 0) + (
        await session.scalar(_UNNUMBERED_EVENTS) or 0
    )
    if waiting > CHANGE_FAN_OUT_LIMIT:
        raise ServiceUnavailable(
            f"{waiting} events wait to be sent to the endpoints as they stand; the change "
            "would wait for all of them. Retry once the worker has caught up.",
            code="WEBHOOKS_BEHIND",
            details={"waiting_events": waiting},
            retry_after=30,
        )
    # A pass numbers a batch at most: a full one may have left more behind. (Commits that
    # come meanwhile are numbered after this change, as if they came after it.)
    while (passed := await sequence_pending(session)) is not None and passed.events >= PASS_LIMIT:
        pass
    up_to = await session.scalar(select(func.max(_EVENTS.c.position)))
    if up_to is not None:
        while await fan_out(session, now, locked=True, up_to=up_to):
            pass


async def fan_out(
    session: AsyncSession,
    now: datetime,
    *,
    limit: int = FAN_OUT_BATCH,
    locked: bool = False,
    up_to: int | None = None,
) -> int:
    """Turn up to `limit` undispatched events into deliveries; returns the events handled.
    `locked`: the caller holds the fan-out lock (PostgreSQL) and has numbered what it wants
    handled, events up to position `up_to`."""
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres and not locked:
        got = await session.scalar(
            text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _FAN_OUT_LOCK}
        )
        if not got:
            return 0
    if not locked:
        # Fan-out takes events in feed order: number what has committed without waiting for
        # the sequencer loop (a pass running elsewhere is left to it).
        await sequence_pending(session, wait=False)
    waiting = select(Event.id, Event.position, Event.type, Event.organisation_id).where(
        Event.dispatched_at.is_(None), Event.position.is_not(None)
    )
    if up_to is not None:
        waiting = waiting.where(Event.position <= up_to)
    events = (await session.execute(waiting.order_by(Event.position).limit(limit))).all()
    if not events:
        return 0
    # FOR SHARE: an endpoint being disabled is waited for, and then left out.
    endpoints = (
        await session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.enabled.is_(True))
            .order_by(WebhookEndpoint.id)
            .with_for_update(read=True)
        )
    ).all()
    # (endpoint id, event) of each delivery to create.
    pairs: list[tuple[int, Any]] = []
    if endpoints:
        targets = await _targets(session, [e for e in events if e.type == WebhookTest.event_type])
        scopes = await _organisation_scopes(session, endpoints)
        matchers = {e.id: TypeMatcher(e.event_types["types"]) for e in endpoints}
        for event in events:
            target = targets.get(event.id)
            for endpoint in endpoints:
                if target is not None and endpoint.public_id != target:
                    continue
                scope = scopes.get(endpoint.id)
                if (
                    event.position > endpoint.after_position
                    and (target is not None or matchers[endpoint.id](event.type))
                    and (scope is None or event.organisation_id in scope)
                ):
                    pairs.append((endpoint.id, event))
    if pairs and postgres:
        await session.execute(
            _INSERT_DELIVERIES_PG,
            {
                "new_public_id": new_public_ids("dlv", len(pairs)),
                "new_endpoint_id": [endpoint_id for endpoint_id, _ in pairs],
                "new_event_id": [event.id for _, event in pairs],
                "new_event_position": [event.position for _, event in pairs],
                "status": DeliveryStatus.PENDING,
                "now": now,
            },
        )
    elif pairs:
        # The public ids from one read of the random source, not one each.
        public_ids = new_public_ids("dlv", len(pairs))
        rows = [
            {
                "public_id": public_id,
                "endpoint_id": endpoint_id,
                "event_id": event.id,
                "event_position": event.position,
                "status": DeliveryStatus.PENDING,
                "attempt_count": 0,
                "schedule_index": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for (endpoint_id, event), public_id in zip(pairs, public_ids, strict=True)
        ]
        await session.execute(insert(_DELIVERIES), rows)
    await session.execute(_MARK_DISPATCHED[postgres], {"ids": [e.id for e in events], "now": now})
    return len(events)


def _insert_deliveries_pg() -> Insert:
    """A fan-out's deliveries in one statement, their varying columns bound as arrays (an
    executemany would bind, send and execute each row on its own)."""
    new = array_rows(
        "new",
        public_id=String,
        endpoint_id=BigInteger,
        event_id=BigInteger,
        event_position=BigInteger,
    )
    now = bindparam("now", type_=_DELIVERIES.c.created_at.type)
    return insert(_DELIVERIES).from_select(
        [
            "public_id",
            "endpoint_id",
            "event_id",
            "event_position",
            "status",
            "attempt_count",
            "schedule_index",
            "next_attempt_at",
            "created_at",
        ],
        select(
            new.c.public_id,
            new.c.endpoint_id,
            new.c.event_id,
            new.c.event_position,
            bindparam("status", type_=String),
            literal(0),
            literal(0),
            now,
            now,
        ),
    )


_INSERT_DELIVERIES_PG = _insert_deliveries_pg()
_WAITING_EVENTS = (
    select(func.count())
    .select_from(_EVENTS)
    .where(_EVENTS.c.dispatched_at.is_(None), _EVENTS.c.position.is_not(None))
)
_UNNUMBERED_EVENTS = select(func.count()).select_from(_EVENTS).where(_EVENTS.c.position.is_(None))
_MARK_DISPATCHED = _for_each_backend(
    lambda postgres: (
        update(_EVENTS)
        .where(_id_in(_EVENTS.c.id, "ids", postgres=postgres))
        .values(dispatched_at=bindparam("now"))
    )
)


async def _targets(session: AsyncSession, test_events: Sequence[Any]) -> dict[int, str]:
    """A `webhook.test` event goes to the one endpoint it names."""
    if not test_events:
        return {}
    rows = await session.execute(
        select(Event.id, Event.data).where(Event.id.in_([e.id for e in test_events]))
    )
    return {row.id: str(row.data.get("endpoint_id")) for row in rows}


async def _organisation_scopes(
    session: AsyncSession, endpoints: Sequence[WebhookEndpoint]
) -> dict[int, frozenset[int]]:
    """An organisation's endpoint receives the events of the organisation and its chapters."""
    roots = {e.organisation_id for e in endpoints if e.organisation_id is not None}
    if not roots:
        return {}
    subtrees = await OrganisationRepository(session).subtrees(roots)
    return {e.id: subtrees[e.organisation_id] for e in endpoints if e.organisation_id is not None}


# Asked at every fan-out check (every FAN_OUT_CHECK_SECONDS while busy): built once.
# An undispatched event's id (or NULL) and an enabled endpoint's (or NULL), in one statement.
_ANY_UNDISPATCHED = select(
    select(_EVENTS.c.id).where(_EVENTS.c.dispatched_at.is_(None)).limit(1).scalar_subquery(),
    select(WebhookEndpoint.id).where(WebhookEndpoint.enabled.is_(True)).limit(1).scalar_subquery(),
)


# ---------------------------------------------------------------- claiming


@dataclass
class EndpointState:
    """What this worker knows of one endpoint between claims."""

    id: int
    public_id: str
    url: str
    ordered: bool
    rate_limit: int | None
    secrets: tuple[str, ...] = ()
    in_flight: int = 0
    tokens: float = 0.0
    refilled_at: float = field(default_factory=time.monotonic)
    # Nothing was due at the last look: not asked again before this (monotonic) time,
    # unless new deliveries or results for it make it worth asking.
    idle_until: float = 0.0
    enabled: bool = True
    failing: bool = False
    # Connections of its own, one per slot sending (see `DeliveryLoop._take_lane`): those
    # not in use.
    idle_lanes: list[Lane] = field(default_factory=list)
    # Claimed ahead, to be sent as sends in flight finish (see `DeliveryLoop.claim`).
    ready: deque[Claimed] = field(default_factory=deque)
    # Running mean of its send times (seconds); None before the first.
    send_seconds: float | None = None
    # `url` parsed, as of the URL it was parsed from.
    _parsed_url: tuple[str, httpx.URL] | None = None

    @property
    def request_url(self) -> httpx.URL:
        """`url` parsed once, not at every send."""
        if self._parsed_url is None or self._parsed_url[0] != self.url:
            self._parsed_url = (self.url, httpx.URL(self.url))
        return self._parsed_url[1]

    def observe_send(self, seconds: float) -> None:
        if self.send_seconds is None:
            self.send_seconds = seconds
        else:
            self.send_seconds += SEND_TIME_WEIGHT * (seconds - self.send_seconds)

    def take_tokens(self, wanted: int) -> int:
        if self.rate_limit is None:
            return wanted
        now = time.monotonic()
        self.tokens = min(
            float(self.rate_limit), self.tokens + (now - self.refilled_at) * self.rate_limit
        )
        self.refilled_at = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


@dataclass(frozen=True)
class Lane:
    """A transport with one connection to an endpoint, used by one slot at a time: slots of
    one pool would race for its connections (a request assigned an idle connection can lose
    it to the next request before it starts, and is assigned again), and the pool would
    look over every connection at each request."""

    transport: httpx.AsyncBaseTransport
    url: str


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    endpoint: EndpointState
    token: str
    attempt_number: int
    schedule_index: int
    event_public_id: str
    event_type: str
    event_version: int
    occurred_at: datetime
    data: dict[str, Any]
    # When (monotonic) the claim's lease runs out and another worker may take it.
    leased_until: float = float("inf")
    # The body, when the claim built it already (once per event, for all its endpoints).
    body: str | None = None


# The claim's statements, built once: a claim only binds its values to them, where
# building and keying them again for each endpoint at each claim cost more CPU than running
# them. An event's data is read as text, to be decoded once per event a claim takes, not
# once per delivery.
_EVENT_DATA = _EVENTS.c.data.cast(Text).label("data")
# An endpoint's pending deliveries (`endpoint_id`), with what their bodies are made of:
_PENDING = (
    select(
        _DELIVERIES.c.id,
        _DELIVERIES.c.attempt_count,
        _DELIVERIES.c.schedule_index,
        _EVENTS.c.public_id,
        _EVENTS.c.type,
        _EVENTS.c.version,
        _EVENTS.c.occurred_at,
        _EVENT_DATA,
    )
    .select_from(_DELIVERIES.join(_EVENTS, _EVENTS.c.id == _DELIVERIES.c.event_id))
    .where(
        _DELIVERIES.c.endpoint_id == bindparam("endpoint_id"),
        _DELIVERIES.c.status == DeliveryStatus.PENDING,
    )
)
# Up to `wanted` due by `now`, soonest first, in the claim index's order and nothing more: a
# tie-break (by id) would sort every delivery due at the same moment (a fan-out's whole
# batch) to take the first few, where the index alone stops after `wanted`.
_DUE = (
    _PENDING.where(_DELIVERIES.c.next_attempt_at <= bindparam("now"))
    .order_by(_DELIVERIES.c.next_attempt_at)
    .limit(bindparam("wanted", type_=Integer))
)
_DUE_FOR_UPDATE = _DUE.with_for_update(skip_locked=True, of=_DELIVERIES)
# An ordered endpoint's oldest unfinished delivery, and when it is due.
_HEAD = (
    _PENDING.add_columns(_DELIVERIES.c.next_attempt_at)
    .order_by(_DELIVERIES.c.event_position, _DELIVERIES.c.id)
    .limit(1)
)
# One of an ordered endpoint's deliveries still leased at `now`.
_LEASED = (
    select(_DELIVERIES.c.id)
    .where(
        _DELIVERIES.c.endpoint_id == bindparam("endpoint_id"),
        _DELIVERIES.c.status == DeliveryStatus.PENDING,
        _DELIVERIES.c.claim_token.is_not(None),
        _DELIVERIES.c.next_attempt_at > bindparam("now"),
    )
    .limit(1)
)
_HOLD_ENDPOINT = (
    select(_ENDPOINTS.c.id)
    .where(_ENDPOINTS.c.id == bindparam("endpoint_id"))
    .with_for_update(skip_locked=True, key_share=True)
)


def _lease(postgres: bool) -> Update:
    """The claimed deliveries (`ids`) leased to `worker` under `token` until `lease_end`."""
    return (
        update(_DELIVERIES)
        .where(_id_in(_DELIVERIES.c.id, "ids", postgres=postgres))
        .values(
            next_attempt_at=bindparam("lease_end"),
            claimed_by=bindparam("worker"),
            claim_token=bindparam("token"),
        )
    )


_LEASE = _for_each_backend(_lease)


def _claimable_all_pg() -> Select[Any]:
    """Each endpoint's claim query (as `_claimable` runs it) for the endpoints and how many
    each wants, bound as two arrays: one statement, prepared once, for any number of them."""
    wanting = array_rows("wanting", endpoint_id=BigInteger, wanted=Integer)
    due = (
        select(
            _DELIVERIES.c.id,
            _DELIVERIES.c.endpoint_id,
            _DELIVERIES.c.event_id,
            _DELIVERIES.c.attempt_count,
            _DELIVERIES.c.schedule_index,
            _DELIVERIES.c.next_attempt_at,
        )
        .where(
            _DELIVERIES.c.endpoint_id == wanting.c.endpoint_id,
            _DELIVERIES.c.status == DeliveryStatus.PENDING,
            _DELIVERIES.c.next_attempt_at <= bindparam("now"),
        )
        .order_by(_DELIVERIES.c.next_attempt_at)
        .limit(wanting.c.wanted)
        .with_for_update(skip_locked=True)
        .lateral("due")
    )
    return (
        select(
            due.c.id,
            due.c.endpoint_id,
            due.c.attempt_count,
            due.c.schedule_index,
            due.c.next_attempt_at,
            _EVENTS.c.public_id,
            _EVENTS.c.type,
            _EVENTS.c.version,
            _EVENTS.c.occurred_at,
            _EVENT_DATA,
        )
        .select_from(wanting)
        .join(due, true())
        .join(_EVENTS, _EVENTS.c.id == due.c.event_id)
        .order_by(due.c.endpoint_id, due.c.next_attempt_at)
    )


_CLAIMABLE_ALL_PG = _claimable_all_pg()


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class AttemptResult:
    claimed: Claimed
    started_at: datetime
    duration: float
    status_code: int | None
    response_body: str | None
    error: str | None
    retry_after: float | None = None
    # No further attempt whatever the schedule says (the payload can never be sent).
    final: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def finished_at(self) -> datetime:
        return self.started_at + timedelta(seconds=self.duration)

    @property
    def gone(self) -> bool:
        return self.status_code == 410


def _retry_after_seconds(value: str | None, now: datetime) -> float | None:
    if value is None:
        return None
    value = value.strip()
    # Delay-seconds (fractions accepted), or an HTTP date.
    with contextlib.suppress(ValueError):
        seconds = float(value)
        return seconds if seconds >= 0 and seconds == seconds else None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, (moment - now).total_seconds())


class DeliveryLoop:
    def __init__(
        self,
        db: Database,
        config: DeliveryConfig,
        box: SecretBox,
        *,
        worker_id: str,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """`tracing`: each send is a trace, its POST a span in it."""
        self.db = db
        self.config = config
        self.box = box
        self.worker_id = worker_id
        self.metrics = metrics
        self.tracing = tracing
        self._endpoints: dict[int, EndpointState] = {}
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._results: asyncio.Queue[AttemptResult] = asyncio.Queue()
        # Set when the recorder waiting for more results should stop waiting.
        self._results_gathered = asyncio.Event()
        self._wake = asyncio.Event()
        self._refreshed_at = -ENDPOINT_REFRESH_SECONDS
        self._rotation = 0
        self._decrypted: dict[str, str] = {}
        # The latest events' decoded data and bodies (and when they were read), by public id:
        # an event claimed for several endpoints in claims of their own within
        # BODIES_KEPT_SECONDS is decoded and serialised once.
        self._bodies: OrderedDict[str, tuple[float, dict[str, Any], str]] = OrderedDict()
        # Connect, read, write and pool timeouts of each request.
        self._timeouts = httpx.Timeout(config.timeout).as_dict()
        self._retired: list[httpx.AsyncBaseTransport] = []
        self._stopping = False
        self._fan_out_due = 0.0
        self._fan_out_limit = FAN_OUT_FIRST_BATCH
        self._fan_out_backlog = False
        # Claimed ahead for an endpoint whose last send failed: handed back unsent.
        self._unsent: list[Claimed] = []

    # -- the loop

    async def run(self, stop: asyncio.Event, *, grace: float | None = None) -> None:
        """Deliver until `stop` is set; then give the sends in flight `grace` seconds (the
        request timeout by default) to finish and be recorded. Sends cut short are sent
        again by whichever worker claims them when their lease ends."""
        self._stopping = False
        async with self._closing_transports():
            recorder = asyncio.create_task(self._record_forever())
            # Fanning out a large backlog takes a while: in its own task, so claims (and
            # the slots they feed) do not wait for it.
            fanned_out = asyncio.Event()
            fanning = asyncio.create_task(self._fan_out_until(fanned_out))
            try:
                while not stop.is_set():
                    self._wake.clear()
                    try:
                        busy = await self.step(fan_out=False)
                    except Exception:
                        log.exception("delivery_step_failed")
                        busy = False
                    if busy and self._in_flight < self.config.concurrency:
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=self.config.poll)
                    # Let a few more sends finish before the next claim.
                    await asyncio.sleep(0.002)
            finally:
                self._stopping = True
                self._results_gathered.set()
                fanned_out.set()
                await fanning
                try:
                    await self._release_ready()
                except Exception:  # their leases run out and they are sent again
                    log.exception("delivery_release_failed")
                if self._tasks:
                    _, unfinished = await asyncio.wait(
                        self._tasks, timeout=self.config.timeout + 1 if grace is None else grace
                    )
                    for task in unfinished:
                        task.cancel()
                    await asyncio.gather(*unfinished, return_exceptions=True)
                await self._results.join()
                recorder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await recorder

    async def step(self, *, fan_out: bool = True) -> bool:
        """Fan out (unless `run` does it in its own task), claim and start sending; True
        when there may be more to do at once."""
        backlog = False
        if fan_out:
            await self._fan_out()
            backlog = self._fan_out_backlog
        self._start_all_ready()
        claimed = await self.claim()
        for item in claimed:
            item.endpoint.ready.append(item)
        self._start_all_ready()
        return backlog or bool(claimed)

    async def _fan_out(self) -> int:
        """One batch of events into deliveries, when there may be some: the events handled
        (`_fan_out_backlog` tells whether more are waiting)."""
        dispatched = 0
        if time.monotonic() < self._fan_out_due:
            # Looked a moment ago: not again yet (and the moment is not put off, or calls
            # more often than FAN_OUT_CHECK_SECONDS would never look again).
            self._fan_out_backlog = False
            return 0
        if (endpoints := await self._undispatched()) is not None:
            # With no endpoint, fan-out only marks events dispatched: short, so on SQLite it
            # runs on the loop's thread. Creating deliveries (up to FAN_OUT_BATCH for each
            # endpoint) runs in a connection's thread, beside the sends.
            # Without endpoints nothing waits on a batch to be sent: the largest at once.
            limit = self._fan_out_limit if endpoints else FAN_OUT_BATCH
            async with self.db.transaction(short=not endpoints) as session:
                dispatched = await fan_out(session, utcnow(), limit=limit)
            # A full batch: there is more, taken in a larger batch; else the next backlog
            # starts small again.
            self._fan_out_backlog = dispatched >= limit
            if endpoints:
                self._fan_out_limit = (
                    min(2 * limit, FAN_OUT_BATCH) if self._fan_out_backlog else FAN_OUT_FIRST_BATCH
                )
        else:
            self._fan_out_backlog = False
        # Looked again at once while there is more to fan out; else not for a moment.
        self._fan_out_due = 0.0 if dispatched else time.monotonic() + FAN_OUT_CHECK_SECONDS
        if dispatched:
            # New deliveries, possibly for endpoints this worker has not seen yet.
            self._refreshed_at = -ENDPOINT_REFRESH_SECONDS
            for endpoint in self._endpoints.values():
                endpoint.idle_until = 0.0
            self._wake.set()
        return dispatched

    async def _fan_out_until(self, done: asyncio.Event) -> None:
        """Fan out until `done` is set: at once while there is a backlog, then every
        FAN_OUT_CHECK_SECONDS while there is work, every poll when idle (or failing)."""
        while not done.is_set():
            pause = self.config.poll
            try:
                dispatched = await self._fan_out()
                if self._fan_out_backlog:
                    continue
                if dispatched or self._in_flight or self._ready:
                    pause = FAN_OUT_CHECK_SECONDS
            except Exception:
                log.exception("delivery_fan_out_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=pause)

    async def run_until_idle(self, *, within: float = 60.0) -> None:
        """Work until nothing is due or in flight (tests and one-off runs)."""
        deadline = time.monotonic() + within
        async with self._closing_transports():
            while time.monotonic() < deadline:
                busy = await self.step()
                if self._tasks:
                    await asyncio.wait(self._tasks)
                busy = await self._record_batch() or busy
                if not busy and not self._tasks:
                    return
            raise TimeoutError("deliveries still due after the timeout")

    async def _undispatched(self) -> bool | None:
        """A cheap read first: most steps find nothing to fan out, and on SQLite the fan-out
        transaction would take the one write lock for nothing. Events not yet numbered count:
        fan-out numbers them. None when there are none; else whether any endpoint is enabled.
        """
        async with self.db.transaction(read_only=True, short=True) as session:
            event, endpoint = (await session.execute(_ANY_UNDISPATCHED)).one()
        return None if event is None else endpoint is not None

    @contextlib.asynccontextmanager
    async def _closing_transports(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for endpoint in self._endpoints.values():
                self._retire_lanes(endpoint)
            retired, self._retired = self._retired, []
            for transport in retired:
                await transport.aclose()

    def _take_lane(self, endpoint: EndpointState) -> Lane:
        """A connection of the endpoint's own for one slot, so a slow endpoint cannot hold
        connections the others need; at most its cap, as it has at most that many slots.

        Sends go straight to the (SSRF-guarded) transport, without an `httpx.AsyncClient`:
        a webhook needs none of a client's cookie jar, redirect and auth machinery, and
        building a request through one costs about as much CPU as the rest of the send."""
        if endpoint.idle_lanes:
            return endpoint.idle_lanes.pop()
        transport: httpx.AsyncBaseTransport = guarded_transport(
            self.config.policy,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        if self.tracing is not None:
            transport = self.tracing.traced_transport(transport, show_path=False)
        return Lane(transport, endpoint.url)

    def _give_back_lane(self, endpoint: EndpointState, lane: Lane) -> None:
        """Kept for the endpoint's next slot, unless its URL changed meanwhile (an endpoint
        no longer enabled has its idle connections closed at the next refresh)."""
        if lane.url == endpoint.url:
            endpoint.idle_lanes.append(lane)
        else:
            self._retired.append(lane.transport)

    def _retire_lanes(self, endpoint: EndpointState) -> None:
        """Its idle connections are closed with the loop's (those in use, when given back)."""
        self._retired += [lane.transport for lane in endpoint.idle_lanes]
        endpoint.idle_lanes.clear()

    # -- claiming

    async def claim(self) -> list[Claimed]:
        # Sends in flight, and up to AHEAD_MAX_CAPS times as many claimed ahead: each
        # endpoint's `_room` decides how many of those it needs.
        free = (1 + AHEAD_MAX_CAPS) * self.config.concurrency - self._in_flight - self._ready
        if free <= 0:
            return []
        now = utcnow()
        leased_until = time.monotonic() + self.config.lease
        token = new_public_id("clm", 16)
        claimed: list[Claimed] = []
        refresh = time.monotonic() - self._refreshed_at >= ENDPOINT_REFRESH_SECONDS
        if not refresh and not any(
            e.enabled and self._room(e) > 0 and time.monotonic() >= e.idle_until
            for e in self._endpoints.values()
        ):
            return []  # every endpoint is busy or idle: no transaction for nothing
        async with self.db.transaction(short=True) as session:
            if refresh:
                await self._refresh_endpoints(session)
            endpoints = [e for e in self._endpoints.values() if e.enabled]
            if not endpoints:
                return []
            # Start with a different endpoint each round, so none is always served last.
            self._rotation = (self._rotation + 1) % len(endpoints)
            rotated = endpoints[self._rotation :] + endpoints[: self._rotation]
            wanting = [
                (endpoint, room)
                for endpoint in rotated
                if (room := self._room(endpoint)) > 0 and time.monotonic() >= endpoint.idle_until
            ]
            requests: list[tuple[EndpointState, int]] = []
            for index, (endpoint, room) in enumerate(wanting):
                if free <= 0:
                    break
                # An even share of what is left, or what fills its idle slots if that is
                # more: the first endpoints of a round cannot take it all ahead.
                idle_slots = self._cap(endpoint) - endpoint.in_flight - len(endpoint.ready)
                share = max(free // (len(wanting) - index), idle_slots)
                wanted = endpoint.take_tokens(min(room, share, free))
                if wanted > 0:
                    requests.append((endpoint, wanted))
                    free -= wanted
            found = await self._claimable_all(session, requests, now)
            # Each event's data decoded and its body built once, for all its deliveries.
            events = self._bodies
            # Read again after a while: an event's data can change (a deleted member's
            # earlier events are erased).
            fresh_after = time.monotonic() - BODIES_KEPT_SECONDS
            for endpoint, wanted in requests:
                rows = found.get(endpoint.id, [])
                if len(rows) < wanted:
                    endpoint.idle_until = time.monotonic() + self.config.poll
                    if endpoint.rate_limit is not None:
                        endpoint.tokens += wanted - len(rows)
                for row in rows:
                    event = events.get(row.public_id)
                    if event is None or event[0] < fresh_after:
                        data = json.loads(row.data)
                        event = events[row.public_id] = (
                            time.monotonic(),
                            data,
                            event_body(row.public_id, row.type, row.version, row.occurred_at, data),
                        )
                        if len(events) > BODIES_KEPT:
                            events.popitem(last=False)
                    _, data, body = event
                    claimed.append(
                        Claimed(
                            delivery_id=row.id,
                            endpoint=endpoint,
                            token=token,
                            attempt_number=row.attempt_count + 1,
                            schedule_index=row.schedule_index,
                            event_public_id=row.public_id,
                            event_type=row.type,
                            event_version=row.version,
                            occurred_at=row.occurred_at,
                            data=data,
                            leased_until=leased_until,
                            body=body,
                        )
                    )
            if claimed:
                await session.execute(
                    _LEASE[session.get_bind().dialect.name == "postgresql"],
                    {
                        "ids": [c.delivery_id for c in claimed],
                        "lease_end": now + timedelta(seconds=self.config.lease),
                        "worker": self.worker_id,
                        "token": token,
                    },
                )
        return claimed

    def _room(self, endpoint: EndpointState) -> int:
        """How many deliveries to claim for `endpoint` now: up to its cap in flight plus some
        waiting (`_ahead`), so a finished send is followed at once by the next, without a
        database round trip. Claims are made in batches (half of what may wait, at most
        four times the cap), unless the endpoint would otherwise idle."""
        cap = self._cap(endpoint)
        ahead = self._ahead(endpoint, cap)
        held = endpoint.in_flight + len(endpoint.ready)
        room = cap + ahead - held
        if held >= cap and room < max(1, min(ahead // 2, 4 * cap)):
            return 0
        return room

    @staticmethod
    def _ahead(endpoint: EndpointState, cap: int) -> int:
        """Deliveries to hold waiting for `endpoint`: none for ordered and failing endpoints;
        otherwise what it takes in about AHEAD_SECONDS at its recent pace, between its cap
        and AHEAD_MAX_CAPS times it. A fast receiver then needs few claims; a slow one's
        deliveries do not wait long after they are claimed."""
        if endpoint.ordered or endpoint.failing:
            return 0
        if endpoint.send_seconds is None:
            return cap
        pace = cap / max(endpoint.send_seconds, 0.001)  # sends a second, with cap in flight
        return max(cap, min(AHEAD_MAX_CAPS * cap, int(pace * AHEAD_SECONDS)))

    @property
    def _ready(self) -> int:
        return sum(len(e.ready) for e in self._endpoints.values())

    def _cap(self, endpoint: EndpointState) -> int:
        if endpoint.ordered:
            return 1
        if endpoint.failing:
            # Still tried in parallel, but dead endpoints cannot fill the worker's slots.
            return min(FAILING_ENDPOINT_CONCURRENCY, self.config.endpoint_concurrency)
        return self.config.endpoint_concurrency

    async def _claimable_all(
        self, session: AsyncSession, requests: Sequence[tuple[EndpointState, int]], now: datetime
    ) -> dict[int, Sequence[Any]]:
        """The deliveries to claim for each (endpoint, how many) of `requests`, by endpoint
        id. On PostgreSQL the endpoints that are not ordered are served by one statement (a
        lateral join running each endpoint's claim query), not one round trip each; an
        ordered endpoint has its own rules (`_claimable`)."""
        found: dict[int, Sequence[Any]] = {}
        together: list[tuple[EndpointState, int]] = []
        if session.get_bind().dialect.name == "postgresql":
            together = [(endpoint, wanted) for endpoint, wanted in requests if not endpoint.ordered]
        if len(together) < 2:
            together = []
        batched = {endpoint.id for endpoint, _ in together}
        for endpoint, wanted in requests:
            if endpoint.id not in batched:
                found[endpoint.id] = await self._claimable(session, endpoint, wanted, now)
        if not together:
            return found
        rows = await session.execute(
            _CLAIMABLE_ALL_PG,
            {
                "wanting_endpoint_id": [endpoint.id for endpoint, _ in together],
                "wanting_wanted": [wanted for _, wanted in together],
                "now": now,
            },
        )
        by_endpoint: dict[int, list[Any]] = {endpoint.id: [] for endpoint, _ in together}
        for row in rows:
            by_endpoint[row.endpoint_id].append(row)
        found.update(by_endpoint)
        return found

    async def _claimable(
        self, session: AsyncSession, endpoint: EndpointState, wanted: int, now: datetime
    ) -> Sequence[Any]:
        postgres = session.get_bind().dialect.name == "postgresql"
        if not endpoint.ordered:
            query = _DUE_FOR_UPDATE if postgres else _DUE
            params = {"endpoint_id": endpoint.id, "now": now, "wanted": wanted}
            return (await session.execute(query, params)).all()
        if postgres:
            # One claimer per ordered endpoint: another worker holding it skips it.
            mine = await session.scalar(_HOLD_ENDPOINT, {"endpoint_id": endpoint.id})
            if mine is None:
                return []
        # One at a time, also when a retry made an older delivery the head while a newer one
        # is still being sent.
        leased = await session.scalar(_LEASED, {"endpoint_id": endpoint.id, "now": now})
        if leased is not None:
            return []
        head = (await session.execute(_HEAD, {"endpoint_id": endpoint.id})).first()
        if head is None or head.next_attempt_at is None or head.next_attempt_at > now:
            return []
        return [head]

    async def _refresh_endpoints(self, session: AsyncSession) -> None:
        rows = (
            await session.scalars(
                select(WebhookEndpoint)
                .where(WebhookEndpoint.enabled.is_(True))
                .order_by(WebhookEndpoint.id)
            )
        ).all()
        now = utcnow()
        self._refreshed_at = time.monotonic()
        current: dict[int, EndpointState] = {}
        for row in rows:
            state = self._endpoints.get(row.id) or EndpointState(
                id=row.id,
                public_id=row.public_id,
                url=row.url,
                ordered=row.ordered,
                rate_limit=row.rate_limit,
                tokens=float(row.rate_limit or 0),
            )
            try:
                secrets = self._secrets(row, now)
            except SecretUnreadable:
                log.error("webhook_secret_unreadable", endpoint=row.public_id)
                continue
            if state.url != row.url:
                # New connections for the new URL; the old ones serve what is in flight.
                self._retire_lanes(state)
            state.url, state.ordered, state.rate_limit = row.url, row.ordered, row.rate_limit
            state.enabled = True
            state.failing = row.failing_since is not None
            state.secrets = secrets
            current[row.id] = state
        # Endpoints gone or disabled: keep their state while sends to them are in flight.
        for endpoint_id, state in self._endpoints.items():
            if endpoint_id in current:
                continue
            state.enabled = False
            if state.in_flight:
                current[endpoint_id] = state
            else:
                lanes, state.idle_lanes = state.idle_lanes, []
                for lane in lanes:
                    await lane.transport.aclose()
        self._endpoints = current

    def _secrets(self, endpoint: WebhookEndpoint, now: datetime) -> tuple[str, ...]:
        secrets = [self._decrypt(endpoint.secret)]
        if (
            endpoint.previous_secret is not None
            and endpoint.previous_secret_expires_at is not None
            and endpoint.previous_secret_expires_at > now
        ):
            secrets.append(self._decrypt(endpoint.previous_secret))
        return tuple(secrets)

    def _decrypt(self, stored: str) -> str:
        plain = self._decrypted.get(stored)
        if plain is None:
            plain = self._decrypted[stored] = self.box.decrypt(stored)
        return plain

    # -- sending

    def _start(self, claimed: Claimed) -> None:
        """Take one of the endpoint's slots (and one of the worker's) to send `claimed`."""
        claimed.endpoint.in_flight += 1
        self._in_flight += 1
        task = asyncio.create_task(self._keep_sending(claimed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_sending(self, claimed: Claimed) -> None:
        """One slot: send `claimed`, then the endpoint's next delivery claimed ahead, and so
        on while there is one, through a connection of the slot's own. A finished send is
        followed at once by the next, in the same task: nothing waits for a claim, a step
        or a new task."""
        endpoint = claimed.endpoint
        following: Claimed | None = claimed
        lane = self._take_lane(endpoint)
        try:
            while following is not None:
                if lane.url != endpoint.url:
                    self._give_back_lane(endpoint, lane)
                    lane = self._take_lane(endpoint)
                await self._send_and_queue(following, lane.transport)
                following = self._next_ready(endpoint)
                if self._room(endpoint) > 0:
                    self._wake.set()  # running low: claim more while this one is sent
        finally:
            self._give_back_lane(endpoint, lane)
            endpoint.in_flight -= 1
            self._in_flight -= 1
            if not self._in_flight:
                self._results_gathered.set()  # nothing more to wait for
        # A slot is free: for another endpoint's delivery waiting for one, or a claim.
        self._start_all_ready()
        self._wake.set()

    def _next_ready(self, endpoint: EndpointState) -> Claimed | None:
        """What the slot of `endpoint` that just finished a send sends next, if it may go on
        (its cap can have shrunk meanwhile, the endpoint failing)."""
        if not endpoint.enabled:
            self._hand_back_ready(endpoint)
            return None
        while (
            endpoint.ready
            and not self._stopping
            and endpoint.in_flight <= self._cap(endpoint)
            and self._in_flight <= self.config.concurrency
        ):
            item = endpoint.ready.popleft()
            if self._sendable(item):
                return item
        return None

    def _sendable(self, item: Claimed) -> bool:
        """Its lease leaves time for a whole attempt (one that does not is left to be
        claimed again when the lease runs out)."""
        return time.monotonic() + self.config.timeout + LEASE_MARGIN_SECONDS < item.leased_until

    async def _send_and_queue(self, claimed: Claimed, transport: httpx.AsyncBaseTransport) -> None:
        try:
            if self.tracing is None:
                result = await self.send(claimed, transport)
            else:
                traced: dict[str, str | int] = {
                    "memberhub.webhook_endpoint.id": claimed.endpoint.public_id,
                    "memberhub.event.id": claimed.event_public_id,
                    "memberhub.event.type": claimed.event_type,
                    "memberhub.delivery.attempt": claimed.attempt_number,
                }
                with work_span(self.tracing, "webhook send", traced):
                    result = await self.send(claimed, transport)
        except Exception as exc:  # a bug here must not lose the attempt
            log.exception("delivery_send_failed", endpoint=claimed.endpoint.public_id)
            result = AttemptResult(
                claimed, utcnow(), 0.0, None, None, f"internal error: {type(exc).__name__}"
            )
        endpoint = claimed.endpoint
        endpoint.observe_send(result.duration)
        if not result.succeeded and endpoint.ready:
            # What the failure means (a retry later, a 410 disabling the endpoint) is known
            # once it is recorded: nothing more goes to the endpoint before that.
            self._unsent.extend(endpoint.ready)
            endpoint.ready.clear()
            endpoint.failing = True
        self._queue_result(result)

    def _start_all_ready(self) -> None:
        for endpoint in self._endpoints.values():
            if endpoint.ready:
                self._start_ready(endpoint)

    def _start_ready(self, endpoint: EndpointState) -> None:
        """Send the endpoint's next delivery claimed ahead, if its lease leaves time for a
        whole attempt (one that does not is left to be claimed again when it runs out)."""
        if self._stopping:
            return
        if not endpoint.enabled:
            self._hand_back_ready(endpoint)
            return
        while endpoint.ready and endpoint.in_flight < self._cap(endpoint):
            if self._in_flight >= self.config.concurrency:
                return
            item = endpoint.ready.popleft()
            if self._sendable(item):
                self._start(item)

    def _hand_back_ready(self, endpoint: EndpointState) -> None:
        """The endpoint was disabled (or deleted) since its deliveries were claimed ahead:
        none of them is sent; they are handed back unsent, for the disabling to settle."""
        self._unsent.extend(endpoint.ready)
        endpoint.ready.clear()

    async def _release_ready(self, *, everything: bool = True) -> None:
        """Hand back what was claimed ahead and not sent (with `everything`, also what is
        still waiting to be sent): due again at once, for any worker."""
        items, self._unsent = self._unsent, []
        if everything:
            items += [item for e in self._endpoints.values() for item in e.ready]
            for endpoint in self._endpoints.values():
                endpoint.ready.clear()
        if not items:
            return
        async with self.db.transaction(short=True) as session:
            for token in {item.token for item in items}:
                await session.execute(
                    update(_DELIVERIES)
                    .where(
                        _DELIVERIES.c.id.in_([i.delivery_id for i in items if i.token == token]),
                        _DELIVERIES.c.claim_token == token,
                        _DELIVERIES.c.status == DeliveryStatus.PENDING,
                    )
                    .values(next_attempt_at=utcnow(), claimed_by=None, claim_token=None)
                )

    def payload(self, claimed: Claimed) -> str:
        if claimed.body is not None:
            return claimed.body
        return event_body(
            claimed.event_public_id,
            claimed.event_type,
            claimed.event_version,
            claimed.occurred_at,
            claimed.data,
        )

    async def send(self, claimed: Claimed, transport: httpx.AsyncBaseTransport) -> AttemptResult:
        started_at = utcnow()
        clock = time.perf_counter()
        body = self.payload(claimed)
        encoded = body.encode()
        if len(encoded) > self.config.max_payload_bytes:
            return AttemptResult(
                claimed,
                started_at,
                0.0,
                None,
                None,
                f"payload of {len(encoded)} bytes exceeds the limit of "
                f"{self.config.max_payload_bytes} bytes",
                final=True,
            )
        headers = {
            **_REQUEST_HEADERS,
            "webhook-id": claimed.event_public_id,
            "webhook-timestamp": str(int(started_at.timestamp())),
            "webhook-signature": signature_header(
                claimed.endpoint.secrets, claimed.event_public_id, started_at, body
            ),
        }
        status: int | None = None
        response_body: str | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            # The whole attempt is bounded, not only each read, write and connect.
            async with asyncio.timeout(self.config.timeout):
                request = httpx.Request(
                    "POST",
                    claimed.endpoint.request_url,
                    headers=headers,
                    content=encoded,
                    extensions={"timeout": self._timeouts},
                )
                response = await transport.handle_async_request(request)
                try:
                    status = response.status_code
                    response_body = await _read_some(response)
                    if status in RETRY_AFTER_STATUSES:
                        retry_after = _retry_after_seconds(
                            response.headers.get("retry-after"), utcnow()
                        )
                finally:
                    # The connection goes back to the pool, or is closed if the body was
                    # left unread.
                    await response.aclose()
        except TimeoutError:
            status, error = None, f"timed out after {self.config.timeout:g} s"
        except DestinationRefused as exc:
            error = f"refused: {exc}"
        except httpx.HTTPError as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__
        if status is not None and not 200 <= status < 300:
            error = f"HTTP {status}" + (
                " (redirects are not followed)" if 300 <= status < 400 else ""
            )
        return AttemptResult(
            claimed,
            started_at,
            time.perf_counter() - clock,
            status,
            response_body,
            error,
            retry_after=retry_after,
        )

    # -- recording

    async def _record_forever(self) -> None:
        while True:
            first = await self._results.get()
            # A moment for the sends about to finish: one transaction for all of them.
            await self._gather_results(time.monotonic() + RECORD_GATHER_SECONDS)
            try:
                await self._record_batch([first])
            except Exception:
                # The leases run out and the deliveries are sent again: at least once.
                log.exception("delivery_record_failed")
                await asyncio.sleep(1.0)

    async def _gather_results(self, deadline: float) -> None:
        """Wait until `deadline` for more results, or until there is no point waiting: a
        full batch is queued, or nothing is in flight (what is queued is all there is), or
        the loop is stopping."""
        while (
            self._in_flight
            and not self._stopping
            and self._results.qsize() + 1 < RECORD_BATCH_TARGET
            and (remaining := deadline - time.monotonic()) > 0
        ):
            self._results_gathered.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._results_gathered.wait(), timeout=remaining)

    def _queue_result(self, result: AttemptResult) -> None:
        self._results.put_nowait(result)
        if self._results.qsize() + 1 >= RECORD_BATCH_TARGET:
            self._results_gathered.set()

    async def _record_batch(self, batch: list[AttemptResult] | None = None) -> bool:
        """Record `batch` (taken from the queue) and whatever else is waiting there."""
        batch = batch or []
        while not self._results.empty() and len(batch) < 1000:
            batch.append(self._results.get_nowait())
        if not batch:
            return False
        try:
            if self._unsent:
                try:
                    await self._release_ready(everything=False)
                except Exception:  # their leases run out and they are sent again
                    log.exception("delivery_release_failed")
            finals = await self._record_with_retries(batch)
        finally:
            for _ in batch:
                self._results.task_done()
        self._observe(batch, finals)
        for result in batch:
            # Its next delivery may be due now (an ordered endpoint's next event).
            result.claimed.endpoint.idle_until = 0.0
        self._wake.set()
        return True

    async def _record_with_retries(self, batch: list[AttemptResult]) -> list[str | None]:
        """Record the batch, trying again while the database is unavailable; if it still
        fails, one result at a time, so one bad result cannot take the others with it. A
        result that cannot be recorded at all is sent again when its lease runs out."""
        for delay in RECORD_RETRY_DELAYS:
            try:
                return await record(self.db, batch, self.config, worker_id=self.worker_id)
            except Exception:
                log.exception("delivery_record_failed", results=len(batch))
                await asyncio.sleep(delay)
        finals: list[str | None] = []
        for result in batch:
            try:
                finals += await record(self.db, [result], self.config, worker_id=self.worker_id)
            except Exception:
                log.exception("delivery_record_dropped", endpoint=result.claimed.endpoint.public_id)
                finals.append(None)
        return finals

    def _observe(self, batch: Sequence[AttemptResult], finals: Sequence[str | None]) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_webhook_attempts(
            (
                result.claimed.endpoint.public_id,
                "success" if result.succeeded else "failure",
                result.duration,
                final,
            )
            for result, final in zip(batch, finals, strict=True)
        )


def event_body(
    public_id: str, event_type: str, version: int, occurred_at: datetime, data: dict[str, Any]
) -> str:
    """What a delivery of the event POSTs (the same for every endpoint)."""
    return json.dumps(
        {
            "id": public_id,
            "type": event_type,
            "version": version,
            "occurred_at": occurred_at.isoformat().replace("+00:00", "Z"),
            "data": data,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


async def _read_some(response: httpx.Response) -> str:
    """The start of the body (2 KB at most), without reading the rest, as text any database
    stores (no NUL characters)."""
    chunks = bytearray()
    async for chunk in response.aiter_bytes():
        chunks.extend(chunk)
        if len(chunks) >= RESPONSE_BODY_LIMIT:
            break
    text = bytes(chunks[:RESPONSE_BODY_LIMIT]).decode("utf-8", errors="replace")
    return text.replace("\x00", "\ufffd")


def next_delay(config: DeliveryConfig, schedule_index: int, retry_after: float | None) -> float:
    """Seconds until the next attempt after a failure of scheduled attempt `schedule_index`
    (the first is 0, sent at once)."""
    scheduled = config.schedule[schedule_index] * random.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        # The receiver's wish, bounded, but never sooner than the schedule: a receiver
        # answering "0" (or one asking for less than the schedule's later gaps) would
        # otherwise use up every attempt early.
        return max(min(retry_after, max(config.max_retry_after, 0.0)), scheduled)
    return scheduled


async def record(
    db: Database, batch: Sequence[AttemptResult], config: DeliveryConfig, *, worker_id: str
) -> list[str | None]:
    """Write a batch of attempt results: attempts, delivery states and endpoint health.
    Returns, per result, the delivery's final status when it has one now."""
    now = utcnow()
    attempts = []
    changes = []
    for result in batch:
        claimed = result.claimed
        attempts.append(
            {
                "delivery_id": claimed.delivery_id,
                "number": claimed.attempt_number,
                "started_at": result.started_at,
                "duration_ms": int(result.duration * 1000),
                "succeeded": result.succeeded,
                "status_code": result.status_code,
                "response_body": result.response_body,
                "error": result.error,
                "worker": worker_id,
            }
        )
        values: dict[str, Any] = {
            "b_id": claimed.delivery_id,
            "b_token": claimed.token,
            "attempt_count": claimed.attempt_number,
            "last_status_code": result.status_code,
            "last_error": result.error,
            "claimed_by": None,
            "claim_token": None,
        }
        if result.succeeded:
            values.update(
                status=DeliveryStatus.SUCCEEDED,
                schedule_index=claimed.schedule_index + 1,
                next_attempt_at=None,
                completed_at=now,
            )
        elif result.final or result.gone or claimed.schedule_index >= len(config.schedule):
            values.update(
                status=DeliveryStatus.FAILED,
                schedule_index=claimed.schedule_index + 1,
                next_attempt_at=None,
                completed_at=now,
            )
        else:
            # Counted from the end of the failed attempt, not from when it is recorded.
            delay = next_delay(config, claimed.schedule_index, result.retry_after)
            values.update(
                status=DeliveryStatus.PENDING,
                schedule_index=claimed.schedule_index + 1,
                next_attempt_at=result.finished_at + timedelta(seconds=delay),
                completed_at=None,
            )
        changes.append(values)  # the same keys in every row: one executemany
    async with db.transaction(short=True) as session:
        # Endpoints first, in id order: the same order as every other writer, so no deadlock.
        endpoint_ids = sorted({r.claimed.endpoint.id for r in batch})
        postgres = session.get_bind().dialect.name == "postgresql"
        locked = await session.execute(
            _LOCK_ENDPOINTS_PG if postgres else _LOCK_ENDPOINTS, {"ids": endpoint_ids}
        )
        endpoints = {row.id: _Health(**row._asdict()) for row in locked}
        finals: list[str | None] = [None] * len(batch)
        kept = []
        for index, (result, values) in enumerate(zip(batch, changes, strict=True)):
            endpoint = endpoints.get(result.claimed.endpoint.id)
            if endpoint is None:
                continue  # deleted meanwhile, with its deliveries: nothing to record
            if values["status"] == DeliveryStatus.PENDING and not endpoint.enabled:
                values.update(
                    status=DeliveryStatus.FAILED,
                    next_attempt_at=None,
                    completed_at=now,
                    last_error=f"{values['last_error']}; the endpoint is disabled"[:500],
                )
            if values["status"] != DeliveryStatus.PENDING:
                finals[index] = values["status"]
            kept.append(index)
        if not kept:
            return finals
        await session.execute(_INSERT_ATTEMPTS, [attempts[i] for i in kept])
        # Successes, nearly all of a batch, differ only in a few values: one statement for
        # each kind (a set of ids) instead of one execution per delivery.
        successes: dict[tuple[str, int, int, int | None], list[int]] = {}
        others = []
        for index in kept:
            values = changes[index]
            if values["status"] == DeliveryStatus.SUCCEEDED:
                kind = (
                    values["b_token"],
                    values["attempt_count"],
                    values["schedule_index"],
                    values["last_status_code"],
                )
                successes.setdefault(kind, []).append(values["b_id"])
            else:
                others.append(values)
        for (token, attempt_count, schedule_index, status_code), ids in successes.items():
            await session.execute(
                _RECORD_SUCCESSES[postgres],
                {
                    "ids": ids,
                    "b_token": token,
                    "attempt_count": attempt_count,
                    "schedule_index": schedule_index,
                    "last_status_code": status_code,
                    "completed_at": now,
                },
            )
        if others:
            await session.execute(_RECORD_RESULTS, others)
        disable = await _update_health(session, endpoints, batch, config, now)
    for endpoint_id, reason in disable:  # rare
        await _disable(db, endpoint_id, reason, now)
    return finals


async def _disable(db: Database, endpoint_id: int, reason: str, now: datetime) -> None:
    """Disable an endpoint that answered 410 or failed for too long, as a PATCH would: the
    events committed so far are fanned out first, so each becomes a delivery (failed by
    the disabling, there to `recover`) rather than being skipped."""
    try:
        async with db.transaction() as session:
            await fan_out_before_change(session, now)
            row = await session.get(WebhookEndpoint, endpoint_id, with_for_update=True)
            if row is not None and row.enabled:
                await service.disable_endpoint(session, row, reason, now=now)
    except ServiceUnavailable:
        # Far behind: disabled at a later batch's results, once fan-out has caught up.
        log.warning("webhook_endpoint_disable_deferred", endpoint_id=endpoint_id)


# The recorder's statements, built once: a batch only binds its values to them, where
# building and keying them again for each batch cost more CPU than running them.
_HEALTH_COLUMNS = (
    _ENDPOINTS.c.id,
    _ENDPOINTS.c.enabled,
    _ENDPOINTS.c.failing_since,
    _ENDPOINTS.c.last_success_at,
    _ENDPOINTS.c.last_failure_at,
)
_LOCK_ENDPOINTS = select(*_HEALTH_COLUMNS).where(_id_in(_ENDPOINTS.c.id, "ids", postgres=False))
_LOCK_ENDPOINTS_PG = (
    select(*_HEALTH_COLUMNS)
    .where(_id_in(_ENDPOINTS.c.id, "ids", postgres=True))
    .order_by(_ENDPOINTS.c.id)
    .with_for_update(key_share=True)
)
_INSERT_ATTEMPTS = insert(_ATTEMPTS)
# Only while the claim is still this worker's (`b_token`).
_RECORD_RESULTS = (
    update(_DELIVERIES)
    .where(
        _DELIVERIES.c.id == bindparam("b_id"),
        _DELIVERIES.c.claim_token == bindparam("b_token"),
    )
    .values(
        {
            name: bindparam(name)
            for name in (
                "attempt_count",
                "last_status_code",
                "last_error",
                "claimed_by",
                "claim_token",
                "status",
                "schedule_index",
                "next_attempt_at",
                "completed_at",
            )
        }
    )
)


def _record_successes(postgres: bool) -> Update:
    return (
        update(_DELIVERIES)
        .where(
            _id_in(_DELIVERIES.c.id, "ids", postgres=postgres),
            _DELIVERIES.c.claim_token == bindparam("b_token"),
        )
        .values(
            status=DeliveryStatus.SUCCEEDED,
            attempt_count=bindparam("attempt_count"),
            schedule_index=bindparam("schedule_index"),
            last_status_code=bindparam("last_status_code"),
            last_error=None,
            claimed_by=None,
            claim_token=None,
            next_attempt_at=None,
            completed_at=bindparam("completed_at"),
        )
    )


_RECORD_SUCCESSES = _for_each_backend(_record_successes)
_UPDATE_HEALTH = (
    update(_ENDPOINTS)
    .where(_ENDPOINTS.c.id == bindparam("b_id"))
    .values(
        {name: bindparam(name) for name in ("failing_since", "last_success_at", "last_failure_at")}
    )
)


@dataclass
class _Health:
    """An endpoint's health columns, as locked by `record`."""

    id: int
    enabled: bool
    failing_since: datetime | None
    last_success_at: datetime | None
    last_failure_at: datetime | None

    def columns(self) -> dict[str, Any]:
        return {
            "b_id": self.id,
            "failing_since": self.failing_since,
            "last_success_at": self.last_success_at,
            "last_failure_at": self.last_failure_at,
        }


async def _update_health(
    session: AsyncSession,
    endpoints: dict[int, _Health],
    batch: Sequence[AttemptResult],
    config: DeliveryConfig,
    now: datetime,
) -> list[tuple[int, str]]:
    """The endpoints' health after the batch, in one statement; returns the endpoints to
    disable (answering 410 or failing for too long), with why."""
    changed = []
    disable: list[tuple[int, str]] = []
    by_endpoint: dict[int, list[AttemptResult]] = {}
    for result in batch:
        if result.final and result.status_code is None:
            continue  # never sent (too large): says nothing about the receiver
        by_endpoint.setdefault(result.claimed.endpoint.id, []).append(result)
    for endpoint_id in sorted(endpoints):
        endpoint = endpoints[endpoint_id]
        before = endpoint.columns()
        gone = None
        for result in sorted(by_endpoint.get(endpoint_id, ()), key=attrgetter("finished_at")):
            finished = result.finished_at
            if result.succeeded:
                endpoint.last_success_at = finished
                endpoint.failing_since = None
            else:
                # Failing for days means attempts failing all that while: after a spell
                # with none (no event to send), the clock starts again at this failure.
                quiet = (
                    endpoint.last_failure_at is not None
                    and (result.started_at - endpoint.last_failure_at).total_seconds()
                    > config.longest_quiet
                )
                if endpoint.failing_since is None or quiet:
                    endpoint.failing_since = result.started_at
                endpoint.last_failure_at = finished
                if result.gone:
                    gone = result
        if endpoint.columns() != before:
            changed.append(endpoint.columns())
        if not endpoint.enabled:
            continue
        if gone is not None:
            disable.append((endpoint_id, "The receiver answered 410 Gone."))
        elif (
            endpoint.failing_since is not None
            and (now - endpoint.failing_since).total_seconds() >= config.disable_after
        ):
            since = endpoint.failing_since.isoformat(timespec="seconds")
            disable.append((endpoint_id, f"No successful delivery since {since}."))
    if changed:
        await session.execute(_UPDATE_HEALTH, changed)
    return disable


async def queue_stats(session: AsyncSession) -> list[tuple[str, int, datetime | None]]:
    """Pending deliveries per endpoint: (endpoint public id, count, oldest creation)."""
    rows = await session.execute(
        select(
            WebhookEndpoint.public_id,
            func.count(WebhookDelivery.id),
            func.min(WebhookDelivery.created_at),
        )
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.status == DeliveryStatus.PENDING)
        .group_by(WebhookEndpoint.public_id)
    )
    return [(row[0], int(row[1]), row[2]) for row in rows]
