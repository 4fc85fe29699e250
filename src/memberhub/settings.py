"""The one settings object. Nothing else in the package reads the environment."""

from __future__ import annotations

import secrets
from enum import StrEnum
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    redis_url: str | None = None
    log_level: str = "INFO"
    log_json: bool = True

    rate_limit: str = Field(
        default="1200/minute",
        description="Default per-API-key rate limit, in the `limits` notation.",
    )
    idempotency_ttl_hours: int = 24
    worker_interval_seconds: float = 5.0
    database_pool_size: int = 10

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        return value.upper()

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

    @cached_property
    def resolved_secret_key(self) -> str:
        """The configured secret, or one kept in the data directory (created on first use)."""
        if self.secret_key:
            return self.secret_key
        self.ensure_data_dir()
        key_file = self.data_dir / "secret_key"
        if key_file.exists():
            return key_file.read_text().strip()
        generated = secrets.token_urlsafe(48)
        key_file.touch(mode=0o600)
        key_file.write_text(generated)
        return generated
