"""Prometheus metrics: one `Metrics` per process (the application's, or the worker's).

One process: each `Metrics` keeps its values in its own registry, so that tests build many
applications in one process without their figures mixing.

Several processes (`memberhub serve --processes N`): before it starts them, `serve` points
PROMETHEUS_MULTIPROC_DIR at a new directory, or empties the one set (`multiprocess_directory`).
prometheus_client, seeing the variable when it is imported, keeps every value of the process
in its files there, and `/metrics` of whichever process answers merges the files of all:
counters and histograms summed over every process that ran since `serve` started, gauges as
each one's `multiprocess_mode` says (`live…`: over the processes still running). A process
leaving marks itself dead (`close`); one killed is marked dead by the next scrape. Only one
`Metrics` may then be built per process: a second would share the first's values.

Three kinds of figures are not kept as values:
- read from the database at each scrape (queue depths, the worker's heartbeat): the scraping
  process renders them (`database_figures`), the same whichever process answers;
- the processes' CPU time, memory and file descriptors: read from /proc at each scrape for
  every live process, labelled by `pid`;
- the database pools' (checked out, size, overflow): each process's own, sampled when it is
  scraped and, with several processes, every POOL_SAMPLE_SECONDS, summed over the processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from memberhub.kit.db import Database

WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)
# prometheus_client's own variable; it reads it itself, and so do the processes `serve` starts.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
POOL_SAMPLE_SECONDS = 5.0
# Every process has one: a file of its live gauges names each process still counted.
_LIVE_GAUGES_FILE = "gauge_livesum_"


@contextlib.contextmanager
def multiprocess_directory(*, processes: int) -> Iterator[None]:
    """Where the processes of `serve` keep their values (they inherit the environment):
    PROMETHEUS_MULTIPROC_DIR when set, emptied of an earlier run's files first; else, for
    several processes, a new temporary directory, removed once they have exited. One process
    without it keeps its values in memory."""
    configured = os.environ.get(MULTIPROCESS_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for earlier in directory.glob("*.db"):
            earlier.unlink()
        yield
        return
    if processes == 1:
        yield
        return
    directory = Path(tempfile.mkdtemp(prefix="memberhub-metrics-"))
    os.environ[MULTIPROCESS_ENV] = str(directory)
    try:
        yield
    finally:
        os.environ.pop(MULTIPROCESS_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def _multiprocess_dir() -> Path | None:
    """Where this process's values are kept, when prometheus_client runs in multiprocess
    mode (PROMETHEUS_MULTIPROC_DIR was set when it was imported)."""
    if not getattr(prometheus_values.ValueClass, "_multiprocess", False):
        return None
    return Path(os.environ[MULTIPROCESS_ENV])


def _count_by_endpoint(
    by_endpoint: Counter, overall: Counter, counts: Tally[tuple[str, str]]
) -> None:
    """Move a counter labelled (endpoint, label) and its overall twin labelled (label) by
    `counts`, once per label set."""
    totals: Tally[str] = Tally()
    for (endpoint, label), count in counts.items():
        by_endpoint.labels(endpoint, label).inc(count)
        totals[label] += count
    for label, count in totals.items():
        overall.labels(label).inc(count)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = _multiprocess_dir()
        # This process's metrics are registered here (the integration gateways' too); with
        # several processes, scrapes read the files of all of them instead.
        self.registry = CollectorRegistry()
        self._engines: list[tuple[str, AsyncEngine]] = []
        self.exposed = self.registry
        if self.multiprocess_dir is not None:
            self.exposed = CollectorRegistry()
            # First, so that a scrape reads the values after it.
            self.exposed.register(_BeforeScrape(self))
            MultiProcessCollector(self.exposed, path=str(self.multiprocess_dir))
        else:
            self.registry.register(_BeforeScrape(self))
        self.exposed.register(_ProcessesCollector(self._counted_pids))

        self.processes = Gauge(
            "memberhub_processes",
            "Processes reporting: the API's and the worker's.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.processes.set(1)
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

        self.pool_size = Gauge(
            "memberhub_db_pool_size",
            "Connections the database pools keep, summed over the processes.",
            ["pool"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.pool_checked_out = Gauge(
            "memberhub_db_pool_checked_out",
            "Pooled database connections in use, summed over the processes.",
            ["pool"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.pool_overflow = Gauge(
            "memberhub_db_pool_overflow",
            "Database connections open beyond the pools' size, summed over the processes.",
            ["pool"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )

        self.job_runs = Counter(
            "memberhub_job_runs_total",
            "Scheduled job runs by job and outcome (success, failure).",
            ["job", "outcome"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "memberhub_job_duration_seconds",
            "Scheduled job run duration by job.",
            ["job"],
            registry=self.registry,
            buckets=JOB_BUCKETS,
        )
        self.job_last_success = Gauge(
            "memberhub_job_last_success_timestamp_seconds",
            "When each scheduled job last finished without error (Unix time).",
            ["job"],
            registry=self.registry,
            # The latest of any process, including ones that ran the worker before.
            multiprocess_mode="max",
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

    def observe_webhook_attempts(
        self, attempts: Iterable[tuple[str, str, float, str | None]]
    ) -> None:
        """A batch of attempts as (endpoint, outcome, seconds, final), `final` being the
        delivery's outcome when it ended with that attempt: each attempt counted and its
        latency observed, the counters moved once per label set."""
        attempted: Tally[tuple[str, str]] = Tally()
        ended: Tally[tuple[str, str]] = Tally()
        latencies: dict[str, list[float]] = {}
        for endpoint, outcome, seconds, final in attempts:
            attempted[endpoint, outcome] += 1
            latencies.setdefault(endpoint, []).append(seconds)
            if final is not None:
                ended[endpoint, final] += 1
        _count_by_endpoint(self.webhook_attempts, self.webhook_attempts_overall, attempted)
        _count_by_endpoint(self.webhook_deliveries, self.webhook_deliveries_overall, ended)
        for endpoint, seconds_list in latencies.items():
            latency = self.webhook_latency.labels(endpoint)
            for seconds in seconds_list:
                latency.observe(seconds)
                self.webhook_latency_overall.observe(seconds)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_job(self, job: str, seconds: float, *, succeeded: bool) -> None:
        self.job_runs.labels(job, "success" if succeeded else "failure").inc()
        self.job_duration.labels(job).observe(seconds)
        if succeeded:
            self.job_last_success.labels(job).set_to_current_time()

    def watch_pools(self, db: Database) -> None:
        """Report `db`'s connection pools: `main`, and on SQLite `requests` beside it."""
        self._engines.append(("main", db.engine))
        if db.request_engine is not db.engine:
            self._engines.append(("requests", db.request_engine))

    def sample_pools(self) -> None:
        for name, engine in self._engines:
            # Read at each sample: disposing of an engine replaces its pool.
            pool = engine.pool
            if not isinstance(pool, QueuePool):
                continue
            self.pool_size.labels(name).set(pool.size())
            self.pool_checked_out.labels(name).set(pool.checkedout())
            # Negative while fewer connections than the size are open.
            self.pool_overflow.labels(name).set(max(0, pool.overflow()))

    async def sample_pools_until(self, stop: asyncio.Event) -> None:
        """With several processes, keep this one's pool figures fresh in the files for the
        others' scrapes; otherwise return at once (a scrape samples them itself)."""
        if self.multiprocess_dir is None:
            return
        while not stop.is_set():
            self.sample_pools()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=POOL_SAMPLE_SECONDS)

    def latest(self, scraped: Sequence[Metric] = ()) -> bytes:
        """The text exposition of every process's metrics, and `scraped`: figures computed
        for this scrape (`database_figures`)."""
        return generate_latest(_Together(self.exposed, _Fixed(scraped)))

    def close(self) -> None:
        """This process is leaving: its live gauges stop counting."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), str(self.multiprocess_dir))

    def before_scrape(self) -> None:
        """Sample this process's pools; mark dead the processes killed (which could not)."""
        self.sample_pools()
        if self.multiprocess_dir is not None:
            for pid in self._counted_pids():
                if not _is_running(pid):
                    mark_process_dead(pid, str(self.multiprocess_dir))

    def _counted_pids(self) -> list[int]:
        """The processes counted in the live gauges."""
        if self.multiprocess_dir is None:
            return [os.getpid()]
        return sorted(
            int(path.stem.removeprefix(_LIVE_GAUGES_FILE))
            for path in self.multiprocess_dir.glob(f"{_LIVE_GAUGES_FILE}*.db")
        )


def database_figures(
    *,
    events_pending: int,
    worker_heartbeat_age: float | None,
    webhook_queue: Iterable[tuple[str, int, float]],
) -> list[Metric]:
    """The figures read from the database for one scrape. `webhook_queue`: (endpoint,
    pending deliveries, age of the oldest in seconds) per endpoint with any pending."""
    queue = list(webhook_queue)
    depth = GaugeMetricFamily(
        "memberhub_webhook_queue_depth",
        "Pending webhook deliveries by endpoint.",
        labels=["endpoint"],
    )
    oldest = GaugeMetricFamily(
        "memberhub_webhook_oldest_pending_age_seconds",
        "Age of the oldest pending delivery by endpoint.",
        labels=["endpoint"],
    )
    for endpoint, pending, age in queue:
        depth.add_metric([endpoint], pending)
        oldest.add_metric([endpoint], age)
    return [
        GaugeMetricFamily(
            "memberhub_events_pending",
            "Outbox events not yet dispatched to their consumers.",
            value=events_pending,
        ),
        GaugeMetricFamily(
            "memberhub_worker_heartbeat_age_seconds",
            "Seconds since the most recent worker heartbeat (-1 when none).",
            value=-1 if worker_heartbeat_age is None else worker_heartbeat_age,
        ),
        depth,
        GaugeMetricFamily(
            "memberhub_webhook_queue_depth_overall",
            "Pending webhook deliveries, every endpoint.",
            value=sum(pending for _, pending, _ in queue),
        ),
        oldest,
        GaugeMetricFamily(
            "memberhub_webhook_oldest_pending_age_overall_seconds",
            "Age of the oldest pending delivery to any endpoint (0 when none).",
            value=max((age for *_, age in queue), default=0),
        ),
    ]


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    return True


class _ProcessesCollector:
    """CPU time, memory and file descriptors of each live process (from /proc, so on Linux),
    as `memberhub_process_…` labelled by `pid`."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self._pids():
            for family in _process_collector(pid).collect():
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        return merged.values()


def _process_collector(pid: int) -> ProcessCollector:
    return ProcessCollector(namespace="memberhub", pid=lambda: pid, registry=None)


class _BeforeScrape:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self._metrics.before_scrape()
        return ()


class _Fixed:
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class _Together:
    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self._collectors:
            yield from collector.collect()
