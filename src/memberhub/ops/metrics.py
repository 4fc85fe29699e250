"""Prometheus metrics, one registry per application instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "memberhub_http_requests_total",
            "HTTP requests by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "memberhub_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.events_pending = Gauge(
            "memberhub_events_pending",
            "Outbox events not yet dispatched to their consumers.",
            registry=self.registry,
        )
        self.worker_heartbeat_age = Gauge(
            "memberhub_worker_heartbeat_age_seconds",
            "Seconds since the most recent worker heartbeat (-1 when none).",
            registry=self.registry,
        )

        self.webhook_attempts = Counter(
            "memberhub_webhook_attempts_total",
            "Webhook delivery attempts by endpoint and outcome (success, failure).",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.webhook_attempts_overall = Counter(
            "memberhub_webhook_attempts_overall_total",
            "Webhook delivery attempts to every endpoint, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_latency = Histogram(
            "memberhub_webhook_attempt_duration_seconds",
            "Webhook attempt latency by endpoint.",
            ["endpoint"],
            registry=self.registry,
            buckets=WEBHOOK_BUCKETS,
        )
        self.webhook_latency_overall = Histogram(
            "memberhub_webhook_attempt_duration_overall_seconds",
            "Webhook attempt latency, every endpoint.",
            registry=self.registry,
            buckets=WEBHOOK_BUCKETS,
        )
        self.webhook_deliveries = Counter(
            "memberhub_webhook_deliveries_total",
            "Webhook deliveries finished, by endpoint and outcome (succeeded, failed).",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.webhook_deliveries_overall = Counter(
            "memberhub_webhook_deliveries_overall_total",
            "Webhook deliveries finished, every endpoint, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_queue_depth = Gauge(
            "memberhub_webhook_queue_depth",
            "Pending webhook deliveries by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.webhook_queue_depth_overall = Gauge(
            "memberhub_webhook_queue_depth_overall",
            "Pending webhook deliveries, every endpoint.",
            registry=self.registry,
        )
        self.webhook_oldest_pending_age = Gauge(
            "memberhub_webhook_oldest_pending_age_seconds",
            "Age of the oldest pending delivery by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.webhook_oldest_pending_age_overall = Gauge(
            "memberhub_webhook_oldest_pending_age_overall_seconds",
            "Age of the oldest pending delivery to any endpoint (0 when none).",
            registry=self.registry,
        )

    def observe_webhook_attempt(
        self, endpoint: str, outcome: str, seconds: float, *, final: str | None
    ) -> None:
        """One attempt; `final` is the delivery's outcome when it ended with this attempt."""
        self.webhook_attempts.labels(endpoint, outcome).inc()
        self.webhook_attempts_overall.labels(outcome).inc()
        self.webhook_latency.labels(endpoint).observe(seconds)
        self.webhook_latency_overall.observe(seconds)
        if final is not None:
            self.webhook_deliveries.labels(endpoint, final).inc()
            self.webhook_deliveries_overall.labels(final).inc()

    def set_webhook_queue(self, stats: list[tuple[str, int, float]]) -> None:
        """(endpoint, pending deliveries, age of the oldest in seconds) per endpoint."""
        self.webhook_queue_depth.clear()
        self.webhook_oldest_pending_age.clear()
        for endpoint, depth, age in stats:
            self.webhook_queue_depth.labels(endpoint).set(depth)
            self.webhook_oldest_pending_age.labels(endpoint).set(age)
        self.webhook_queue_depth_overall.set(sum(depth for _, depth, _ in stats))
        self.webhook_oldest_pending_age_overall.set(max((age for *_, age in stats), default=0))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
