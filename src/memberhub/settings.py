"""The one settings object. Nothing else in the package reads the environment."""

from __future__ import annotations

import re
import secrets
from datetime import time
from enum import StrEnum
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from memberhub.kit.limits import parse_rate_limit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_durations(value: str) -> tuple[float, ...]:
    """`5s,5m,30m,2h` → seconds. Bare numbers are seconds; units `ms`, `s`, `m`, `h`, `d`."""
    delays = []
    for part in value.split(","):
        if not part.strip():
            continue
        match = _DURATION.match(part)
        if match is None:
            raise ValueError(f"'{part.strip()}' is not a duration such as 5s, 5m or 2h")
        delays.append(float(match.group(1)) * _UNITS[match.group(2) or "s"])
    return tuple(delays)


class SecretKeyMissing(RuntimeError):
    pass


class Environment(StrEnum):
    development = "development"
    production = "production"
    test = "test"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMBERHUB_", extra="ignore")

    env: Environment = Environment.development
    data_dir: Path = Path("./data")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; defaults to SQLite at DATA_DIR/memberhub.db.",
    )
    secret_key: str | None = Field(
        default=None,
        description="Master secret; generated into DATA_DIR/secret_key on first run when unset.",
    )
    backup_passphrase: SecretStr | None = Field(
        default=None,
        description="Passphrase that seals the secret key in backups and `secrets export` "
        "(otherwise given by file or asked for at a terminal).",
    )
    redis_url: str | None = None
    log_level: str = Field(
        default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)."
    )
    log_json: bool = True

    rate_limit: str = Field(
        default="1200/minute",
        description="Default per-API-key rate limit, in the `limits` notation.",
    )
    unauthenticated_rate_limit: str = Field(
        default="100/15 minutes",
        description="Requests without a valid API key allowed per client address.",
    )
    idempotency_ttl_hours: int = Field(default=24, ge=1)
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body (JSON) accepted; more is refused with 413 as it "
        "streams in.",
    )
    bulk_upload_max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="Largest bulk award upload; more is refused with 413 as it streams in. "
        "Past its first MiB, an upload is received into an unnamed temporary file in DATA_DIR.",
    )
    worker_interval_seconds: float = Field(default=5.0, ge=0.01)
    database_pool_size: int = Field(default=10, ge=1)

    # Outbound webhooks.
    webhook_allowed_networks: str = Field(
        default="",
        description="Comma-separated CIDRs that webhook URLs may resolve to although private "
        "(loopback, private, link-local, CGNAT, ...); empty refuses them all.",
    )
    webhook_allow_http: bool = Field(
        default=False, description="Accept plain http:// webhook URLs (https only otherwise)."
    )
    webhook_retry_schedule: str = Field(
        default="5s,5m,30m,2h,5h,10h,10h",
        description="Delays between attempts after the first, immediate one; each ±20% jitter.",
    )
    webhook_timeout_seconds: float = Field(default=15.0, gt=0)
    webhook_max_payload_bytes: int = Field(default=256 * 1024, ge=1024)
    webhook_max_retry_after_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="Upper bound on a receiver's Retry-After (429, 502, 503, 504).",
    )
    webhook_disable_after_seconds: float = Field(
        default=5 * 86400.0,
        gt=0,
        description="Disable an endpoint failing for this long without a single success.",
    )
    webhook_concurrency: int = Field(default=64, ge=1, description="Deliveries in flight.")
    webhook_endpoint_concurrency: int = Field(
        default=8, ge=1, description="Deliveries in flight to one endpoint at most."
    )
    webhook_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How long a worker owns a claimed delivery; a dead worker's claims are "
        "taken over after it. At least the request timeout and 5 s more is used.",
    )
    webhook_poll_seconds: float = Field(
        default=0.5, ge=0.01, description="How often an idle delivery loop looks for new work."
    )

    # Notifications.
    notification_lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="How long a worker owns a notification it is sending; a dead worker's "
        "are sent by another after it. Must exceed a provider's longest send.",
    )
    notification_concurrency: int = Field(
        default=8, ge=1, le=256, description="Notifications one worker sends at once."
    )

    serve_processes: int = Field(
        default=0,
        ge=0,
        le=64,
        description="API processes `memberhub serve` runs (0: one per CPU core on PostgreSQL, "
        "one on SQLite). The embedded worker runs in one of them at a time.",
    )

    cache_ttl_seconds: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="How long each process keeps API keys, program settings and tiers; a "
        "change made through another process is seen within this (at once for processes "
        "sharing DATA_DIR; 0: no caching).",
    )

    # Exports (`exports/jobs.py`).
    export_part_rows: int = Field(
        default=250_000,
        ge=100,
        description="Rows per export part: a file per partition date per part, and the unit "
        "a run resumes from after its worker died.",
    )
    export_page_rows: int = Field(
        default=10_000,
        ge=100,
        le=1_000_000,
        description="Rows read per query and held in memory while exporting.",
    )
    export_lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="How long a worker owns an export run without recording a part; a dead "
        "worker's run is taken over after it.",
    )

    # The sequencer (event feed positions and the audit chain, assigned after commit).
    sequencer_interval_seconds: float = Field(
        default=0.05,
        gt=0,
        le=60,
        description="How often the worker's sequencer looks for changes committed by other "
        "processes (its own process's commits wake it at once).",
    )

    # Integrations.
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Where providers and browsers reach this installation: inbound webhook "
        "URLs and OAuth redirect URIs are built from it.",
    )
    integration_log_retention_days: float = Field(
        default=14.0, gt=0, description="How long the payload log keeps outbound calls."
    )
    sentry_dsn: str | None = Field(
        default=None, description="Send unhandled errors to this Sentry DSN (none when unset)."
    )
    sentry_traces_sample_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of requests traced to Sentry."
    )
    # OpenTelemetry traces. The endpoint and the service name are also read from the standard
    # OTEL_ variables: their second alias, the field's name, is that variable's name (names
    # are case-insensitive). The MEMBERHUB_ one wins when both are set.
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "MEMBERHUB_OTEL_EXPORTER_OTLP_ENDPOINT", "otel_exporter_otlp_endpoint"
        ),
        pattern=r"^https?://[^\s]+$",
        description="Export traces of requests, job runs and webhook sends, with their SQL "
        "statements and outbound HTTP calls, over OTLP/HTTP (protobuf) to the collector at "
        "this base URL (traces are POSTed to /v1/traces under it), e.g. "
        "http://127.0.0.1:4318. Unset: nothing is traced and no tracing code is loaded.",
    )
    otel_service_name: str = Field(
        default="memberhub",
        min_length=1,
        validation_alias=AliasChoices("MEMBERHUB_OTEL_SERVICE_NAME", "otel_service_name"),
        description="The service.name of the exported traces.",
    )
    otel_traces_sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of traces started here that are recorded; a request carrying a "
        "traceparent header follows its caller's decision instead.",
    )
    daily_jobs_at: str = Field(
        default="03:00",
        pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$",
        description="When daily jobs (tier review, rate alerts) run, HH:MM in the program's "
        "time zone.",
    )
    retention_days: float = Field(
        default=90.0,
        ge=1,
        description="How long events, webhook deliveries and attempts, inbound events and "
        "CRM sync runs are kept once finished; the audit log is kept forever.",
    )
    notification_retention_days: float = Field(
        default=180.0,
        ge=31,
        description="How long notifications (with their rendered subject and body) are kept "
        "once sent, delivered, bounced, failed or suppressed; at least 31 days, so the "
        "deduplication windows (up to 30 days) still see what was sent.",
    )

    # Staff sign-in and the console.
    staff_lockout_attempts: int = Field(
        default=5, ge=1, le=100, description="Failed password sign-ins that lock a staff account."
    )
    staff_lockout_minutes: float = Field(
        default=15.0, gt=0, description="How long a locked staff account stays locked."
    )
    sign_in_rate_limit: str = Field(
        default="20/5 minutes",
        description="Console sign-in attempts allowed per client address, and per account.",
    )
    console_idle_minutes: float = Field(
        default=30.0, gt=0, description="A console session ends after this long unused."
    )
    console_session_hours: float = Field(
        default=12.0, gt=0, description="A console session ends this long after sign-in."
    )
    console_cookie_secure: bool | None = Field(
        default=None,
        description="Send the console's cookie over HTTPS only; unset: everywhere but "
        "ENV=development.",
    )
    oidc_issuer: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s]+$",
        description="OpenID Connect single sign-on for the console: the provider's issuer URL "
        "(its discovery document is at ISSUER/.well-known/openid-configuration). Unset: "
        "password sign-in only.",
    )
    oidc_client_id: str | None = Field(default=None, description="The console's OIDC client id.")
    oidc_client_secret: SecretStr | None = Field(
        default=None, description="The console's OIDC client secret."
    )
    oidc_allowed_email_domains: str = Field(
        default="",
        description="Comma-separated email domains allowed to sign in by SSO; empty allows any "
        "verified email of an existing staff account.",
    )
    oidc_auto_create_role: str | None = Field(
        default=None,
        pattern=r"^(admin|manager|support_agent)$",
        description="Create a staff account with this role on a first SSO sign-in by an "
        "unknown (allowed) email; unset: only existing staff accounts may sign in.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        # Checked here, so that a mistyped URL is refused without being echoed (it may hold
        # a password) by the library that would read it.
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        """A plain `postgresql://`, `postgres://` or `sqlite:///` URL means the async driver
        the service uses; another driver is refused by name."""
        if not value:
            return value
        scheme, separator, rest = value.partition("://")
        if not separator:
            raise ValueError("must be a URL such as postgresql+asyncpg://user@host/db")
        drivers = {
            "postgresql": "postgresql+asyncpg",
            "postgres": "postgresql+asyncpg",
            "postgresql+asyncpg": "postgresql+asyncpg",
            "sqlite": "sqlite+aiosqlite",
            "sqlite+aiosqlite": "sqlite+aiosqlite",
        }
        if scheme.lower() not in drivers:
            raise ValueError(
                f"the scheme {scheme[:30]!r} is not one memberhub runs on: use "
                "postgresql+asyncpg://… (or postgresql://…) or sqlite+aiosqlite:///…"
            )
        driver = drivers[scheme.lower()]
        if driver == "postgresql+asyncpg":
            return _asyncpg_url(f"{driver}://{rest}")
        return f"{driver}://{rest}"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("otel_exporter_otlp_endpoint", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `OTEL_EXPORTER_OTLP_ENDPOINT=` (set but empty) means no tracing, as it does for
        # the OpenTelemetry SDK.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("rate_limit", "unauthenticated_rate_limit", "sign_in_rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        # At start-up, not at the first request: ValueError for anything but the `limits`
        # notation, or a limit that lets nothing through.
        parse_rate_limit(value)
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        parse_durations(value)
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _check_networks(cls, value: str) -> str:
        # Imported here: the webhooks package itself imports the settings.
        from memberhub.webhooks.ssrf import parse_networks

        parse_networks(value)
        return value

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer and self.oidc_client_id)

    @property
    def oidc_email_domains(self) -> frozenset[str]:
        return frozenset(
            d.strip().lower().lstrip("@")
            for d in self.oidc_allowed_email_domains.split(",")
            if d.strip()
        )

    @property
    def console_secure_cookie(self) -> bool:
        if self.console_cookie_secure is not None:
            return self.console_cookie_secure
        return self.env != Environment.development

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        return parse_durations(self.webhook_retry_schedule)

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'memberhub.db').as_posix()}"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    def ensure_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def daily_jobs_time(self) -> time:
        hours, minutes = self.daily_jobs_at.split(":")
        return time(int(hours), int(minutes))

    @cached_property
    def resolved_secret_key(self) -> str:
        """The configured secret, or one kept in the data directory (created on first use)."""
        if self.secret_key:
            return self.secret_key
        self.ensure_data_dir()
        key_file = self.data_dir / "secret_key"
        if key_file.exists():
            return key_file.read_text().strip()
        if self.env == Environment.production:
            # A new key could not read a single stored credential: never make one silently.
            raise SecretKeyMissing(
                f"ENV=production: set MEMBERHUB_SECRET_KEY or provide {key_file}; "
                "no key is generated in production."
            )
        generated = secrets.token_urlsafe(48)
        key_file.touch(mode=0o600)
        key_file.write_text(generated)
        return generated


def _asyncpg_url(value: str) -> str:
    """A PostgreSQL URL as asyncpg takes it: libpq's `sslmode` (which asyncpg does not know)
    becomes `ssl`, its name there for the same values; a port must be one. Nothing of the
    URL is echoed (it may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise ValueError("is not a URL such as postgresql+asyncpg://user@host/db") from None
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError("names a port outside 1 to 65535")
    if "sslmode" not in url.query:
        return value
    if "ssl" in url.query:
        raise ValueError("sets both ssl and sslmode: keep one")
    sslmode = url.query["sslmode"]
    query = {key: item for key, item in url.query.items() if key != "sslmode"}
    url = url.set(query={**query, "ssl": sslmode})
    return url.render_as_string(hide_password=False)
