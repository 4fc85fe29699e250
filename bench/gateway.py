"""What the integration gateway adds per call, as a ratio to a bare httpx client in the same run.

Three clients call the same local server, in the same process and event loop:

- raw: a bare `httpx.AsyncClient(base_url=..., timeout=...)`, as the gateway builds its own,
  doing `await client.get(path)`;
- gateway: `Gateway.request("GET", path)` with no client-side rate limit, so the figure is
  the breaker, retry bookkeeping, request building and Prometheus metrics;
- gateway+limiter: the same with a limiter too permissive to ever make a call wait
  (LIMITER_RATE), so the difference from `gateway` is the limiter's own cost.

The server is a bare ASGI app under uvicorn in a child process (`python -m bench.gateway
--serve PORT`), so it does not share the measured event loop. It answers a small JSON body
at once (`no-op`), or after sleeping SLOW_SECONDS (`2ms`: closer to a real vendor call,
where the gateway's cost is a small part of the whole).

For each server case, after a warm-up of every client (sequential calls, then one
concurrent burst so every client holds its connections), each of 5 rounds times:

- sequential: N calls one at a time, each timed; the round's p50 and p95 per call;
- concurrent: 2N calls, CONCURRENCY in flight; the round's calls per second.

The clients take turns in an order that rotates every round, so drift falls on all of
them alike; the medians over the rounds are reported. Every call must answer 200, and the
server must have seen exactly the calls made (no silent retries); otherwise the bench
exits 1.

Ratios (1.0 would mean the gateway costs nothing over bare httpx):

- sequential: gateway p50 / raw p50 (lower is better), with the microseconds added;
- concurrent: gateway / raw calls per second (higher is better).

    python -m bench.gateway                    # the full run
    python -m bench.gateway --quick            # a breakage check: small numbers
    python -m bench.gateway --calls 5000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.common import free_port, running_child, serve_asgi
from memberhub.integrations.gateway import Gateway, GatewayPolicy

FULL_CALLS = 1_000
QUICK_CALLS = 40
# Concurrent rounds make this many times the sequential calls.
CONCURRENT_FACTOR = 2
ROUNDS = 5
CONCURRENCY = 16
WARMUP_CALLS = 200
QUICK_WARMUP_CALLS = 20
# Far above anything one process reaches here: the limiter is consulted but never waits.
LIMITER_RATE = "100000 per second"
SLOW_SECONDS = 0.002
# (label, path): what the server does before answering.
CASES = (("no-op", "/fast"), ("2ms", "/slow"))
BODY = json.dumps({"id": "cnt_0001", "email": "member@example.com", "points": 120}).encode()


# -- the server (the child process) ----------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class FakeVendor:
    """Answers `GET /fast` at once and `GET /slow` after SLOW_SECONDS with a small JSON
    body, counting both; `GET /count` tells the count, `GET /health` that it is up."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] == "GET" and path in ("/fast", "/slow"):
            self.calls += 1
            if path == "/slow":
                await asyncio.sleep(SLOW_SECONDS)
            await _reply(send, 200, BODY)
        elif scope["method"] == "GET" and path == "/count":
            await _reply(send, 200, json.dumps({"calls": self.calls}).encode())
        elif scope["method"] == "GET" and path == "/health":
            await _reply(send, 200, b'{"status": "ok"}')
        else:
            await _reply(send, 404, b'{"error": "not found"}')


async def _reply(send: Send, status: int, body: bytes) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def running_server() -> Iterator[str]:
    """The fake vendor in a child process; yields its base URL."""
    port = free_port()
    with running_child(["bench.gateway", "--serve", str(port)], port) as base_url:
        yield base_url


async def server_calls(client: httpx.AsyncClient) -> int:
    response = await client.get("/count")
    response.raise_for_status()
    calls: int = response.json()["calls"]
    return calls


# -- the clients -----------------------------------------------------------------------------

Call = Callable[[str], Awaitable[None]]


def expect_ok(side: str, path: str, response: httpx.Response) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"{side}: GET {path} answered {response.status_code}")


def raw_call(client: httpx.AsyncClient) -> Call:
    async def call(path: str) -> None:
        expect_ok("raw", path, await client.get(path))

    return call


def gateway_call(side: str, gateway: Gateway) -> Call:
    async def call(path: str) -> None:
        expect_ok(side, path, await gateway.request("GET", path))

    return call


@dataclass(frozen=True)
class Side:
    name: str
    call: Call


# -- measuring -------------------------------------------------------------------------------


async def per_call_seconds(call: Call, path: str, count: int) -> list[float]:
    """`count` calls one after another, each timed."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        await call(path)
        seconds.append(time.perf_counter() - started)
    return seconds


async def calls_per_second(call: Call, path: str, count: int, concurrency: int) -> float:
    """`count` calls, `concurrency` in flight."""
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1  # no await in between: each call is taken by exactly one worker
            await call(path)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return count / (time.perf_counter() - started)


def p95(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=20)[18]


@dataclass
class Samples:
    """One side's figures in one case, one entry per round."""

    p50_seconds: list[float]
    p95_seconds: list[float]
    per_second: list[float]

    @property
    def p50_us(self) -> float:
        return statistics.median(self.p50_seconds) * 1e6

    @property
    def p95_us(self) -> float:
        return statistics.median(self.p95_seconds) * 1e6

    @property
    def calls_per_second(self) -> float:
        return statistics.median(self.per_second)


@dataclass(frozen=True)
class Sizes:
    calls: int
    concurrent_calls: int
    rounds: int
    warmup: int
    concurrency: int

    @property
    def calls_per_case(self) -> int:
        """Calls each side makes to the server in one case, warm-up included."""
        return self.warmup + self.concurrency + self.rounds * (self.calls + self.concurrent_calls)


async def bench_case(sides: Sequence[Side], path: str, sizes: Sizes) -> dict[str, Samples]:
    for side in sides:
        await per_call_seconds(side.call, path, sizes.warmup)
        # One call per worker: every client opens its connections before the clock runs.
        await calls_per_second(side.call, path, sizes.concurrency, sizes.concurrency)
    samples = {side.name: Samples([], [], []) for side in sides}
    for round_number in range(sizes.rounds):
        shift = round_number % len(sides)
        order = [*sides[shift:], *sides[:shift]]
        for side in order:
            seconds = await per_call_seconds(side.call, path, sizes.calls)
            samples[side.name].p50_seconds.append(statistics.median(seconds))
            samples[side.name].p95_seconds.append(p95(seconds))
        for side in order:
            rate = await calls_per_second(
                side.call, path, sizes.concurrent_calls, sizes.concurrency
            )
            samples[side.name].per_second.append(rate)
    return samples


# -- results ---------------------------------------------------------------------------------


def _prefix(case: str, mode: str, side: str) -> str:
    return f"{case:<6} {mode:<13} {side:<16}"


def sequential_line(case: str, side: str, measured: Samples, raw: Samples) -> str:
    return (
        f"{_prefix(case, 'sequential', side)} p50 {measured.p50_us:7.0f} µs "
        f"p95 {measured.p95_us:7.0f} µs   raw p50 {raw.p50_us:7.0f} µs "
        f"p95 {raw.p95_us:7.0f} µs   added {measured.p50_us - raw.p50_us:+6.0f} µs   "
        f"ratio {measured.p50_us / raw.p50_us:.3f}"
    )


def concurrent_line(case: str, side: str, concurrency: int, measured: Samples, raw: Samples) -> str:
    return (
        f"{_prefix(case, f'{concurrency} in flight', side)} "
        f"{measured.calls_per_second:8.1f} calls/s   raw {raw.calls_per_second:8.1f} calls/s   "
        f"ratio {measured.calls_per_second / raw.calls_per_second:.3f}"
    )


async def run(base_url: str, sizes: Sizes) -> list[str]:
    """Every case measured and printed; returns the problems found."""
    timeout = httpx.Timeout(GatewayPolicy().timeout)
    open_policy = GatewayPolicy(rate_limit=None)
    limited_policy = GatewayPolicy(rate_limit=LIMITER_RATE)
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=timeout) as client,
        httpx.AsyncClient(base_url=base_url, timeout=timeout) as probe,
        Gateway("bench", base_url, policy=open_policy) as gateway,
        Gateway("bench_limited", base_url, policy=limited_policy) as limited,
    ):
        sides = [
            Side("raw", raw_call(client)),
            Side("gateway", gateway_call("gateway", gateway)),
            Side("gateway+limiter", gateway_call("gateway+limiter", limited)),
        ]
        before = await server_calls(probe)
        for case, path in CASES:
            samples = await bench_case(sides, path, sizes)
            raw = samples["raw"]
            for side in sides[1:]:
                print(sequential_line(case, side.name, samples[side.name], raw), flush=True)
            for side in sides[1:]:
                line = concurrent_line(case, side.name, sizes.concurrency, samples[side.name], raw)
                print(line, flush=True)
        seen = await server_calls(probe) - before
    expected = len(CASES) * len(sides) * sizes.calls_per_case
    if seen != expected:
        return [f"the server saw {seen} calls, {expected} made"]
    return []


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small numbers, to check it runs")
    parser.add_argument(
        "--calls",
        type=int,
        help=f"sequential calls per round and client, {CONCURRENT_FACTOR} times as many "
        f"concurrent ones (default {FULL_CALLS})",
    )
    parser.add_argument(
        "--rounds", type=int, help=f"rounds per client, the median counts (default {ROUNDS})"
    )
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help=f"default {CONCURRENCY}"
    )
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    # At least 20 per round: p95 takes 20 quantiles.
    calls = max(20, args.calls or (QUICK_CALLS if args.quick else FULL_CALLS))
    return Sizes(
        calls=calls,
        concurrent_calls=CONCURRENT_FACTOR * calls,
        rounds=args.rounds or (1 if args.quick else ROUNDS),
        warmup=QUICK_WARMUP_CALLS if args.quick else WARMUP_CALLS,
        concurrency=args.concurrency,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve_asgi(FakeVendor(), args.serve)
        return 0
    sizes = sizes_from(args)
    print(
        "integration gateway vs bare httpx.AsyncClient.get to a local server: "
        f"{sizes.calls} sequential calls and {sizes.concurrent_calls} calls "
        f"{sizes.concurrency} in flight per round and client, median of {sizes.rounds} "
        "round(s); sequential ratio = p50 latency / raw (lower is better), "
        "concurrent ratio = calls/s / raw (higher is better)"
    )
    with running_server() as base_url:
        problems = asyncio.run(run(base_url, sizes))
    for problem in problems:
        print(f"GATEWAY CHECK FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
