"""The one client through which every outbound call to a third-party API goes.

A `Gateway` serves one integration (one vendor account) and adds, around httpx:

- a client-side rate limiter at the vendor's published rate: calls wait for a slot, never
  dropped;
- a circuit breaker: when too many recent attempts failed, calls fail fast with
  `CircuitOpen` instead of piling onto a vendor that is down;
- retries with exponential backoff and full jitter on network errors, 5xx and 429, waiting
  what the vendor asks for (`Retry-After`, rate-limit reset headers) when it says;
- Prometheus metrics per integration;
- a refresh of expired credentials: a 401 calls `refresh` once and resends the call;
- a record of every call (`CallRecord`, secrets redacted) handed to `observer`, which the
  integration hub writes to the payload log.

    async with Gateway("hubspot", "https://api.hubapi.com",
                       policy=VENDOR_POLICIES["hubspot"], auth=bearer(token)) as hubspot:
        response = await hubspot.request("GET", "/crm/v3/objects/contacts")

Which base URL to use (production or the vendor's sandbox) is the caller's choice: pass
the sandbox URL as `base_url` for a sandbox connection.

2xx, 3xx and 4xx other than 429 are returned as they are; a call that still gets a 5xx,
a 429 or a network error when it may not (or may no longer) retry raises `GatewayError`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import time
import urllib.parse
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from memberhub.kit.limits import parse_rate_limit

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
AuthHook = Callable[[httpx.Request], Awaitable[None]]
# Renews the credentials `auth` applies (an OAuth refresh); False: nothing to renew.
RefreshHook = Callable[[], Awaitable[bool]]
Observer = Callable[["CallRecord"], None]
T = TypeVar("T")

# Retrying these after a 5xx or a lost connection could apply them twice, unless the
# vendor deduplicates them by an idempotency key.
NON_IDEMPOTENT_METHODS = frozenset({"POST", "PATCH"})
BODY_EXCERPT_CHARS = 500
# What the payload log keeps of each request and response body.
LOGGED_BODY_CHARS = 4000
# How much of a body is redacted before it is cut to what is kept: a secret is masked
# whole, never cut at the limit (where its pattern would no longer match) and kept in part.
REDACTED_WINDOW_CHARS = 1024 * 1024
# Above this, a reset header is a Unix timestamp rather than a number of seconds.
_EPOCH_THRESHOLD = 1_000_000_000


class ResponseTooLarge(httpx.TransportError):
    """The vendor's answer is larger than the policy reads."""


@dataclass(frozen=True)
class GatewayPolicy:
    """How one integration's calls are timed, retried, rate-limited and cut off."""

    # Each attempt's whole exchange, connection to last byte.
    timeout: float = 30.0
    # The largest answer read: a larger (or endless) one fails the call, unread.
    max_response_bytes: int = 64 * 1024 * 1024
    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    # The longest wait a vendor's Retry-After or reset header may impose on one retry.
    max_retry_after: float = 60.0
    # A longer wait asked for: False, wait max_retry_after and try again; True, give up
    # the call at once (GatewayError.retry_after) for the caller to try again when asked
    # (Xero's day limit asks for hours: tries every 2 minutes would spend the entry's).
    longer_waits_to_caller: bool = False
    breaker_window: float = 60.0
    breaker_min_calls: int = 10
    breaker_failure_ratio: float = 0.5
    breaker_open_seconds: float = 30.0
    # In `limits` notation, e.g. "100/10 seconds"; None: no client-side limit.
    rate_limit: str | None = None
    # Further windows every call must also fit in (a vendor's daily allowance beside its
    # per-minute one); not replaced by an integration's `rate_limit` setting.
    also_limited_to: tuple[str, ...] = ()
    # At most this many calls in flight at once; None: no limit.
    max_concurrent: int | None = None


DEFAULT_POLICY = GatewayPolicy(rate_limit="10 per second")

# Published limits, taking the lowest tier where they depend on the vendor's plan.
VENDOR_POLICIES: dict[str, GatewayPolicy] = {
    # Private apps / OAuth apps on Free and Starter accounts: 100 requests per 10 seconds.
    "hubspot": GatewayPolicy(rate_limit="100/10 seconds"),
    # Live mode: 100 read and 100 write operations per second (test mode allows 25).
    "stripe": GatewayPolicy(rate_limit="100 per second"),
    # No per-second limit: a rolling 24-hour allowance per org (100,000 on Enterprise
    # before per-licence additions); exhausting it answers 403 REQUEST_LIMIT_EXCEEDED.
    "salesforce": GatewayPolicy(rate_limit="100000 per day"),
    # api_token on the Essential plan: 20 requests per 2-second window.
    "pipedrive": GatewayPolicy(rate_limit="20 per 2 seconds"),
    # Graph throttles by resource units per app and tenant, with no fixed rate: answers
    # 429/503 with a Retry-After that can reach minutes. Parts of large uploads take time.
    "microsoft_graph": GatewayPolicy(
        timeout=120.0, rate_limit="50 per second", max_retry_after=300.0, max_attempts=6
    ),
    # Indexing: Algolia queues writes as tasks; its published ceiling is per application.
    "algolia": GatewayPolicy(timeout=60.0, rate_limit="50 per second", max_retry_after=120.0),
    # Per tenant (organisation): 60 calls a minute, 5,000 a day, 5 at once; a 429 says
    # which (X-Rate-Limit-Problem) and how long to wait (Retry-After).
    "xero": GatewayPolicy(
        rate_limit="60 per minute",
        also_limited_to=("5000 per day",),
        max_concurrent=5,
        max_retry_after=120.0,
        longer_waits_to_caller=True,
    ),
    # No published request rate; 10 connections at once per API key (one more is a 429),
    # and calls time out after 120 seconds.
    "mailchimp": GatewayPolicy(timeout=120.0, rate_limit=None, max_concurrent=10),
    "default": DEFAULT_POLICY,
}


class CircuitOpen(Exception):
    """The integration's circuit breaker is open: the call was not sent."""

    def __init__(self, integration: str, retry_after: float) -> None:
        super().__init__(f"circuit open for {integration}; retry in {retry_after:.1f}s")
        self.integration = integration
        self.retry_after = retry_after


class GatewayError(Exception):
    """A call that failed for good: its last 5xx or 429 response, or its network error."""

    def __init__(
        self,
        integration: str,
        message: str,
        *,
        status: int | None = None,
        body_excerpt: str = "",
        error: BaseException | None = None,
        attempts: int = 1,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{integration}: {message}")
        self.integration = integration
        self.status = status
        self.body_excerpt = body_excerpt
        self.error = error
        self.attempts = attempts
        # The vendor asked for a wait longer than the policy waits within a call (a
        # day's limit spent): seconds to wait before the next try, for the caller.
        self.retry_after = retry_after


class ExchangeRefused(Exception):
    """Raised by an `Gateway.exchange` operation when the far side answered and refused
    this one request (the equivalent of an HTTP 4xx): the service itself is healthy."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ExchangeNotSent(Exception):
    """Raised by an `Gateway.exchange` operation that failed before anything of the
    request reached the far side (no connection, refused greeting): safe to try again."""


@dataclass(frozen=True)
class CallRecord:
    """One call as the payload log keeps it: every attempt's wait included, secrets masked."""

    integration: str
    method: str
    url: str
    # ok, client_error, failed or circuit_open (the `calls` metric's outcomes).
    outcome: str
    status: int | None
    attempts: int
    started_at: datetime
    duration_ms: int
    request_headers: dict[str, str]
    request_body: str
    response_body: str
    error: str | None


class BreakerState(Enum):
    # The values are those of the breaker-state gauge.
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Opens when the failure ratio over a sliding time window crosses a threshold.

    Closed: everything passes and outcomes are recorded. Once the window holds at least
    `min_calls` outcomes of which at least `failure_ratio` failed, the breaker opens and
    `allow()` is False for `open_seconds`. Then it is half-open: `allow()` lets exactly one
    probe through at a time; the probe's success closes the breaker (with an empty window),
    its failure opens it again for another `open_seconds`.
    """

    def __init__(
        self,
        *,
        window: float,
        min_calls: int,
        failure_ratio: float,
        open_seconds: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self.window = window
        self.min_calls = min_calls
        self.failure_ratio = failure_ratio
        self.open_seconds = open_seconds
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, failed)
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through; 0 when not open."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.open_seconds - self._clock())

    def allow(self) -> bool:
        """Whether a call may be sent now; in half-open state, True reserves the probe."""
        if self._state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.open_seconds:
                return False
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = False
        if self._state is BreakerState.HALF_OPEN:
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._close()
        elif self._state is BreakerState.CLOSED:
            self._record(failed=False)

    def record_failure(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._open()
        elif self._state is BreakerState.CLOSED:
            self._record(failed=True)
            failures = sum(failed for _, failed in self._outcomes)
            calls = len(self._outcomes)
            if calls >= self.min_calls and failures / calls >= self.failure_ratio:
                self._open()

    def record_inconclusive(self) -> None:
        """An outcome that says nothing of the vendor's health (a 429, a cancellation).

        It is not counted; a half-open breaker frees its probe slot for the next call.
        """
        if self._state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False

    def _record(self, *, failed: bool) -> None:
        now = self._clock()
        self._outcomes.append((now, failed))
        while self._outcomes and self._outcomes[0][0] <= now - self.window:
            self._outcomes.popleft()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probe_in_flight = False
        self._outcomes.clear()

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._probe_in_flight = False
        self._outcomes.clear()


class RateLimiter:
    """At most `amount` acquisitions in any moving window of `seconds`; callers queue FIFO.

    Built from `limits` notation ("100/10 seconds"). In-process: each worker process has
    its own budget.
    """

    def __init__(
        self, notation: str, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        item = parse_rate_limit(notation)
        self.amount = item.amount
        self.seconds = float(item.get_expiry())
        self._clock = clock
        self._sleep = sleep
        self._granted: deque[float] = deque()
        # asyncio.Lock wakes waiters in arrival order, so the queue is fair.
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                while self._granted and self._granted[0] <= now - self.seconds:
                    self._granted.popleft()
                if len(self._granted) < self.amount:
                    self._granted.append(now)
                    return
                await self._sleep(self._granted[0] + self.seconds - now)


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "memberhub_gateway_calls",
            "Outbound calls by final outcome: ok, client_error, failed, circuit_open.",
            ["integration", "outcome"],
            registry=registry,
        )
        self.attempts = Counter(
            "memberhub_gateway_attempts",
            "HTTP attempts by result: the status class (2xx..5xx) or network_error.",
            ["integration", "result"],
            registry=registry,
        )
        self.latency = Histogram(
            "memberhub_gateway_attempt_duration_seconds",
            "Duration of one HTTP attempt, rate-limit and backoff waits excluded.",
            ["integration"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "memberhub_gateway_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["integration"],
            registry=registry,
            # Each process has its own breaker: with several, the most open of those running.
            multiprocess_mode="livemax",
        )


# One set of metrics per registry: several gateways share a registry without registering
# the same names twice.
_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = (
    weakref.WeakKeyDictionary()
)


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    metrics = _metrics_by_registry.get(registry)
    if metrics is None:
        metrics = _metrics_by_registry[registry] = _Metrics(registry)
    return metrics


@dataclass
class _Call:
    """What `request` learns of a call while it runs, for its `CallRecord`."""

    started_at: datetime
    started: float
    attempts: int = 0
    status: int | None = None
    outcome: str = "failed"
    response_excerpt: str = ""


class Gateway:
    """The HTTP client of one integration; see the module docstring."""

    def __init__(
        self,
        integration: str,
        base_url: str,
        *,
        policy: GatewayPolicy,
        auth: AuthHook | None = None,
        refresh: RefreshHook | None = None,
        observer: Observer | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        registry: CollectorRegistry | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        """`sleep` waits out retry backoffs; `clock` times the breaker."""
        self.integration = integration
        self.policy = policy
        self.registry = registry if registry is not None else CollectorRegistry()
        self.breaker = CircuitBreaker(
            window=policy.breaker_window,
            min_calls=policy.breaker_min_calls,
            failure_ratio=policy.breaker_failure_ratio,
            open_seconds=policy.breaker_open_seconds,
            clock=clock,
        )
        # Real time, whatever `sleep` is: the limiter protects the vendor, not the test.
        self.rate_limiter = RateLimiter(policy.rate_limit) if policy.rate_limit else None
        self.extra_limiters = [RateLimiter(notation) for notation in policy.also_limited_to]
        self._in_flight = (
            asyncio.Semaphore(policy.max_concurrent) if policy.max_concurrent else None
        )
        self._auth = auth
        self._refresh = refresh
        self._observer = observer
        self._sleep = sleep
        self._client = httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(policy.timeout), transport=transport
        )
        self._metrics = _metrics_for(self.registry)
        self._show_breaker_state()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        retry_safe: bool = False,
    ) -> httpx.Response:
        """Send the call, retrying as the policy allows.

        A POST or PATCH is retried after a 5xx only when sending it twice does no harm: it
        carries an `Idempotency-Key`, or the caller says it is `retry_safe` (an upsert by a
        unique key, an update to given values).

        Raises `CircuitOpen` when the breaker stops an attempt, `GatewayError` when the
        last attempt got a 5xx, a 429 or a network error. `content` sends raw bytes (a
        file's part); the payload log keeps only their length.
        """
        method = method.upper()
        request_headers = dict(headers or {})
        if idempotency_key is not None:
            request_headers["Idempotency-Key"] = idempotency_key
        request = self._client.build_request(
            method,
            path,
            params=params,
            json=json,
            data=data,
            content=content,
            headers=request_headers,
        )
        call = _Call(started_at=datetime.now(UTC), started=time.perf_counter())
        try:
            response = await self._send_with_retries(
                request, call, retry_safe or idempotency_key is not None
            )
        except (CircuitOpen, GatewayError) as exc:
            self._observe(request, call, outcome=call.outcome, error=str(exc))
            raise
        except BaseException as exc:
            self._observe(request, call, outcome="failed", error=repr(exc))
            raise
        self._observe(request, call, outcome=call.outcome, response=response)
        return response

    async def exchange(
        self,
        method: str,
        target: str,
        operation: Callable[[], Awaitable[T]],
        *,
        request_headers: Mapping[str, str] | None = None,
        request_summary: str = "",
    ) -> T:
        """Run one non-HTTP exchange (an SMTP session, say) under this gateway's rate
        limit, circuit breaker, metrics and payload log, as `request` runs an HTTP call.

        `operation` does the exchange. It raises `ExchangeRefused` when the far side
        refused this one request (recorded as a client error; the breaker counts it a
        success), `ExchangeNotSent` when nothing reached the far side (retried with the
        policy's backoff, as a connection that was never made is for HTTP); anything else
        is a failure that is not retried here, since the request may have been applied,
        and is raised as `GatewayError`. `method` and `target` name the exchange in the
        log and the metrics ("SMTP", "smtp://host:587").
        """
        call = _Call(started_at=datetime.now(UTC), started=time.perf_counter())
        error: str | None = None
        try:
            while True:
                call.attempts += 1
                allowed = self.breaker.allow()
                self._show_breaker_state()
                if not allowed:
                    call.outcome = "circuit_open"
                    self._count_call("circuit_open")
                    raise CircuitOpen(self.integration, self.breaker.retry_after())
                if self.rate_limiter is not None:
                    await self.rate_limiter.acquire()
                started = time.perf_counter()
                recorded = False
                try:
                    try:
                        result = await operation()
                    except ExchangeRefused as exc:
                        self._count_attempt("4xx", started)
                        self.breaker.record_success()
                        recorded = True
                        call.status = exc.status
                        call.outcome = "client_error"
                        self._count_call("client_error")
                        error = str(exc)
                        raise
                    except ExchangeNotSent as exc:
                        self._count_attempt("network_error", started)
                        self.breaker.record_failure()
                        recorded = True
                        if call.attempts >= self.policy.max_attempts:
                            call.outcome = "failed"
                            self._count_call("failed")
                            raise GatewayError(
                                self.integration,
                                f"{method} {target} failed: {exc}",
                                error=exc,
                                attempts=call.attempts,
                            ) from exc
                    except (CircuitOpen, GatewayError):
                        raise
                    except Exception as exc:
                        self._count_attempt("network_error", started)
                        self.breaker.record_failure()
                        recorded = True
                        call.outcome = "failed"
                        self._count_call("failed")
                        raise GatewayError(
                            self.integration,
                            f"{method} {target} failed: {exc}",
                            error=exc,
                            attempts=call.attempts,
                        ) from exc
                    else:
                        self._count_attempt("2xx", started)
                        self.breaker.record_success()
                        recorded = True
                        call.outcome = "ok"
                        self._count_call("ok")
                        return result
                finally:
                    if not recorded:
                        self.breaker.record_inconclusive()
                    self._show_breaker_state()
                await self._sleep(self._backoff(call.attempts))
        except (CircuitOpen, GatewayError) as exc:
            error = str(exc)
            raise
        except ExchangeRefused:
            raise
        except BaseException as exc:
            error = repr(exc)
            raise
        finally:
            self._observe_exchange(method, target, call, request_headers, request_summary, error)

    def _observe_exchange(
        self,
        method: str,
        target: str,
        call: _Call,
        headers: Mapping[str, str] | None,
        summary: str,
        error: str | None,
    ) -> None:
        if self._observer is None:
            return
        self._observer(
            CallRecord(
                integration=self.integration,
                method=method,
                url=target,
                outcome=call.outcome,
                status=call.status,
                attempts=call.attempts,
                started_at=call.started_at,
                duration_ms=round((time.perf_counter() - call.started) * 1000),
                request_headers=redact(dict(headers or {})),
                request_body=_logged(summary, LOGGED_BODY_CHARS),
                response_body="",
                error=error,
            )
        )

    async def _send_with_retries(
        self, template: httpx.Request, call: _Call, retry_safe: bool
    ) -> httpx.Response:
        method = template.method
        path = template.url.path
        may_retry_failures = method not in NON_IDEMPOTENT_METHODS or retry_safe
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            call.attempts = attempt
            allowed = self.breaker.allow()
            self._show_breaker_state()
            if not allowed:
                call.outcome = "circuit_open"
                self._count_call("circuit_open")
                raise CircuitOpen(self.integration, self.breaker.retry_after())
            # A fresh request each attempt: auth may change its headers.
            request = self._client.build_request(
                method, template.url, headers=template.headers, content=template.content
            )
            try:
                response = await self._attempt(request)
            except httpx.TransportError as exc:
                # A connection never made carried no request: safe to retry for any method.
                retryable = may_retry_failures or isinstance(
                    exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
                )
                if isinstance(exc, ResponseTooLarge):
                    retryable = False  # it would be as large again
                if not retryable or attempt >= self.policy.max_attempts:
                    call.outcome = "failed"
                    self._count_call("failed")
                    raise GatewayError(
                        self.integration,
                        f"{method} {path} failed: {exc!r}",
                        error=exc,
                        attempts=attempt,
                    ) from exc
                await self._sleep(self._backoff(attempt))
                continue

            status = response.status_code
            call.status = status
            if status == 401 and self._refresh is not None and not refreshed:
                # Expired or revoked credentials: renew them once and send again; the
                # attempt spent on the 401 does not count against the retries.
                refreshed = True
                if await self._refresh():
                    attempt -= 1
                    continue
            if status < 500 and status != 429:
                call.outcome = "ok" if status < 400 else "client_error"
                self._count_call(call.outcome)
                return response
            retryable = status == 429 or may_retry_failures
            asked = requested_wait(response.headers)
            too_long = (
                self.policy.longer_waits_to_caller
                and asked is not None
                and asked > self.policy.max_retry_after
            )
            if not retryable or attempt >= self.policy.max_attempts or too_long:
                # A wait longer than a call may take is not cut short and tried early:
                # the caller is told how long (`retry_after`) and tries again then.
                call.outcome = "failed"
                call.response_excerpt = _logged(response.text, BODY_EXCERPT_CHARS)
                self._count_call("failed")
                raise GatewayError(
                    self.integration,
                    f"{method} {path} answered {status}"
                    + (f"; retry after {asked:g} s" if too_long and asked is not None else ""),
                    status=status,
                    body_excerpt=_logged(response.text, BODY_EXCERPT_CHARS),
                    attempts=attempt,
                    retry_after=asked if retryable and too_long else None,
                )
            await self._sleep(self._wait_before_retry(asked, attempt))

    def _observe(
        self,
        request: httpx.Request,
        call: _Call,
        *,
        outcome: str,
        response: httpx.Response | None = None,
        error: str | None = None,
    ) -> None:
        if self._observer is None:
            return
        response_body = call.response_excerpt
        if response is not None:
            response_body = _logged(response.text, LOGGED_BODY_CHARS)
        self._observer(
            CallRecord(
                integration=self.integration,
                method=request.method,
                url=redact_url(str(request.url)),
                outcome=outcome,
                status=call.status,
                attempts=call.attempts,
                started_at=call.started_at,
                duration_ms=round((time.perf_counter() - call.started) * 1000),
                request_headers=redact(dict(request.headers)),
                request_body=_logged_request_body(request),
                response_body=response_body,
                error=error,
            )
        )

    async def _attempt(self, request: httpx.Request) -> httpx.Response:
        """One HTTP exchange, with its rate-limit slot, auth, breaker outcome and metrics."""
        if self.rate_limiter is not None:
            await self.rate_limiter.acquire()
        for limiter in self.extra_limiters:
            await limiter.acquire()
        if self._in_flight is None:
            return await self._exchange(request)
        async with self._in_flight:
            return await self._exchange(request)

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        if self._auth is not None:
            await self._auth(request)
        started = time.perf_counter()
        outcome_recorded = False
        try:
            try:
                response = await self._whole_answer(request)
            except httpx.TransportError:
                self._count_attempt("network_error", started)
                self.breaker.record_failure()
                outcome_recorded = True
                raise
            self._count_attempt(f"{response.status_code // 100}xx", started)
            if response.status_code >= 500:
                self.breaker.record_failure()
            elif response.status_code == 429:
                # The vendor asks us to slow down; it is not unhealthy.
                self.breaker.record_inconclusive()
            else:
                self.breaker.record_success()
            outcome_recorded = True
            return response
        finally:
            if not outcome_recorded:
                # Cancelled or broken mid-attempt: free a half-open probe slot.
                self.breaker.record_inconclusive()
            self._show_breaker_state()

    async def _whole_answer(self, request: httpx.Request) -> httpx.Response:
        """Send and read the answer within the policy's timeout (httpx's own bounds each
        step: a server sending a byte at a time would outlast it) and size."""
        limit = self.policy.max_response_bytes
        try:
            async with asyncio.timeout(self.policy.timeout):
                response = await self._client.send(request, stream=True)
                try:
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise ResponseTooLarge(
                                f"the answer is larger than {limit} bytes", request=request
                            )
                        chunks.append(chunk)
                finally:
                    await response.aclose()
        except TimeoutError:
            raise httpx.ReadTimeout(
                f"no whole answer within {self.policy.timeout:g} s", request=request
            ) from None
        response._content = b"".join(chunks)  # as `aread` keeps what it read
        return response

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform between 0 and the exponential ceiling of this attempt."""
        ceiling = min(self.policy.backoff_max, self.policy.backoff_base * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)

    def _wait_before_retry(self, asked: float | None, attempt: int) -> float:
        """The vendor's wait (`requested_wait`), at most max_retry_after; else a backoff."""
        if asked is None:
            return self._backoff(attempt)
        return min(asked, self.policy.max_retry_after)

    def _count_call(self, outcome: str) -> None:
        self._metrics.calls.labels(self.integration, outcome).inc()

    def _count_attempt(self, result: str, started: float) -> None:
        self._metrics.attempts.labels(self.integration, result).inc()
        self._metrics.latency.labels(self.integration).observe(time.perf_counter() - started)

    def _show_breaker_state(self) -> None:
        self._metrics.breaker_state.labels(self.integration).set(self.breaker.state.value)


def _logged_request_body(request: httpx.Request) -> str:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/octet-stream") or (
        request.content and not content_type
    ):
        # A file's bytes: their size says all the log needs.
        return f"<{len(request.content)} bytes>"
    return _logged(
        request.content[:REDACTED_WINDOW_CHARS].decode(errors="replace"), LOGGED_BODY_CHARS
    )


def _logged(text: str, limit: int) -> str:
    """`text` as it may be kept: secrets masked first, then cut to `limit`."""
    return redact_body(text[:REDACTED_WINDOW_CHARS])[:limit]


def requested_wait(headers: httpx.Headers) -> float | None:
    """Seconds the vendor asks us to wait before retrying, if its headers say.

    Looks at `Retry-After` (seconds or an HTTP date), then `X-RateLimit-Reset` /
    `RateLimit-Reset` (seconds, or a Unix timestamp as some vendors send), then HubSpot's
    `X-HubSpot-RateLimit-Interval-Milliseconds` (the length of its rate-limit window).
    """
    retry_after = headers.get("retry-after")
    if retry_after is not None:
        seconds = _parse_seconds_or_date(retry_after)
        if seconds is not None:
            return seconds
    for name in ("x-ratelimit-reset", "ratelimit-reset"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if number > _EPOCH_THRESHOLD:
            return max(0.0, number - time.time())
        return max(0.0, number)
    interval_ms = headers.get("x-hubspot-ratelimit-interval-milliseconds")
    if interval_ms is not None:
        try:
            return max(0.0, float(interval_ms) / 1000)
        except ValueError:
            pass
    return None


def _parse_seconds_or_date(value: str) -> float | None:
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


# Headers whose values are secrets: those named so (a signature, HMAC, secret, token or
# API key: Stripe-Signature, X-Shopify-Hmac-Sha256, X-Algolia-API-Key, a configured
# X-Acme-Signature), and credentials whose names do not say it.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_SECRET_HEADER_NAME = re.compile(r"signature|hmac|secret|token|api-?key", re.IGNORECASE)
_VISIBLE_TAIL = 4


def redact(headers: Mapping[str, str], *, also: Iterable[str] = ()) -> dict[str, str]:
    """A copy of `headers` for logs, secret values masked but for their last 4 characters;
    `also` names more headers to mask (an integration's configured signature header).

    Values of 8 characters or fewer are masked entirely: their last 4 would be half the
    secret.
    """
    extra = {name.lower() for name in also}
    redacted: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in SECRET_HEADERS or lowered in extra or _SECRET_HEADER_NAME.search(lowered):
            tail = value[-_VISIBLE_TAIL:] if len(value) > 2 * _VISIBLE_TAIL else ""
            value = f"***{tail}"
        redacted[name] = value
    return redacted


# Body fields and query parameters whose values are masked in the payload log.
_SECRET_FIELD = re.compile(
    r"(secret|token|password|passwd|api[_-]?key|apikey|hapikey|authorization|"
    r"client_secret|code_verifier|signature|assertion|card|cvc|iban)",
    re.IGNORECASE,
)
# `"name": "value"` in JSON and `name=value` in forms and query strings (Stripe's
# `card[number]=` included).
_JSON_FIELD = re.compile(r'"([^"\\]{1,100})"(\s*:\s*)"((?:[^"\\]|\\.)*)"')
_FORM_FIELD = re.compile(r"(^|[&?])([^=&?]{1,100})=([^&]*)")


# An OAuth authorization code, by its exact name: "postal_code" is no secret. Microsoft
# Graph's pre-authenticated upload and download URLs carry theirs as `tempauth`.
_SECRET_NAMES = frozenset({"code", "tempauth"})


# A pre-authenticated URL inside a body (Graph's `uploadUrl`, `@microsoft.graph.downloadUrl`).
_EMBEDDED_URL_SECRET = re.compile(r"(tempauth=)[^&\"'\s\\]+", re.IGNORECASE)


def _is_secret_field(name: str) -> bool:
    return name.lower() in _SECRET_NAMES or _SECRET_FIELD.search(name) is not None


def _mask(value: str) -> str:
    return f"***{value[-_VISIBLE_TAIL:]}" if len(value) > 2 * _VISIBLE_TAIL else "***"


def redact_body(body: str) -> str:
    """`body` with the values of secret-looking JSON or form fields masked."""

    def json_field(match: re.Match[str]) -> str:
        name, colon, value = match.groups()
        if _is_secret_field(name):
            value = _mask(value)
        return f'"{name}"{colon}"{value}"'

    def form_field(match: re.Match[str]) -> str:
        lead, name, value = match.groups()
        if _is_secret_field(urllib.parse.unquote_plus(name)):
            value = _mask(value)
        return f"{lead}{name}={value}"

    if body.lstrip().startswith(("{", "[")):
        return _EMBEDDED_URL_SECRET.sub(r"\1***", _JSON_FIELD.sub(json_field, body))
    return _FORM_FIELD.sub(form_field, body)


def redact_url(url: str) -> str:
    """`url` without user info and with secret-looking query parameters masked."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    query = redact_body(parts.query) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
