"""Per-key rate limits with the `limits` library: in memory, or Redis across API nodes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string

from memberhub.kit.errors import RateLimited

log = structlog.get_logger("memberhub.ratelimit")
# A failing shared store is logged at most this often.
STORE_FAILURE_LOG_SECONDS = 60.0


@dataclass(frozen=True)
class Quota:
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }


class RateLimiter:
    def __init__(self, default_limit: str, redis_url: str | None = None) -> None:
        self.default_limit = parse(default_limit)
        storage: Storage = MemoryStorage()
        if redis_url:
            shared = storage_from_string("async+" + redis_url)
            assert isinstance(shared, Storage)
            storage = shared
        self.storage = storage
        self.strategy = FixedWindowRateLimiter(storage)
        # While a shared store fails, this process counts on its own: the limits hold per
        # process (as without REDIS_URL) rather than not at all.
        self._local = FixedWindowRateLimiter(MemoryStorage())
        self._store_failed_at = -math.inf
        self._parsed: dict[str, RateLimitItem] = {}

    def _store_failed(self, exc: Exception) -> FixedWindowRateLimiter:
        now = time.monotonic()
        if now - self._store_failed_at > STORE_FAILURE_LOG_SECONDS:
            log.warning(
                "rate_limit_store_unavailable", error=type(exc).__name__, counting="per process"
            )
            self._store_failed_at = now
        return self._local

    def _item(self, limit: str | None) -> RateLimitItem:
        if limit is None:
            return self.default_limit
        if limit not in self._parsed:
            self._parsed[limit] = parse(limit)
        return self._parsed[limit]

    async def hit(
        self, key_id: str, limit: str | None = None, *, namespace: str = "apikey"
    ) -> Quota | None:
        """Count one request; raise RateLimited past the limit.

        A failing shared store neither takes the API down nor lifts the limits: this
        process counts on its own meanwhile (logged once a minute).
        """
        item = self._item(limit)
        try:
            allowed = await self.strategy.hit(item, namespace, key_id)
            stats = await self.strategy.get_window_stats(item, namespace, key_id)
        except Exception as exc:  # the shared store is down: count here
            local = self._store_failed(exc)
            allowed = await local.hit(item, namespace, key_id)
            stats = await local.get_window_stats(item, namespace, key_id)
        quota = Quota(
            limit=item.amount,
            remaining=max(0, stats.remaining),
            reset_seconds=max(1, math.ceil(stats.reset_time - time.time())),
        )
        if not allowed:
            raise RateLimited(
                f"Rate limit of {item.amount} requests per "
                f"{item.multiples} {item.GRANULARITY.name} exceeded.",
                retry_after=quota.reset_seconds,
                headers=quota.headers(),
            )
        return quota

    async def refuse_if_spent(self, key_id: str, limit: str, *, namespace: str) -> None:
        """Raise RateLimited when `key_id` has no requests left in this window, without
        counting one."""
        item = self._item(limit)
        try:
            stats = await self.strategy.get_window_stats(item, namespace, key_id)
        except Exception as exc:  # the shared store is down: count here
            stats = await self._store_failed(exc).get_window_stats(item, namespace, key_id)
        if stats.remaining <= 0:
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
            raise RateLimited(
                f"Too many requests without a valid API key from this address; "
                f"retry in {retry_after} s.",
                retry_after=retry_after,
            )

    async def reset(self) -> None:
        await self.storage.reset()
