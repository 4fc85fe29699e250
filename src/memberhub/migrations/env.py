"""Alembic environment: one set of migrations for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Any

from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo
from sqlalchemy.engine import Connection

from memberhub.kit.db import create_engine
from memberhub.models import Base
from memberhub.settings import Settings

config = context.config
target_metadata = Base.metadata


def _note_applied(
    ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any], run_args: Mapping[str, Any]
) -> None:
    """Keep each revision applied, for `memberhub db upgrade` to report."""
    if step.is_upgrade:
        config.attributes.setdefault("applied", []).append(
            (step.up_revision_id, getattr(step.up_revision, "doc", ""))
        )


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        on_version_apply=_note_applied,
    )
    with context.begin_transaction():
        context.run_migrations()


def _database_url() -> str:
    # Set by `memberhub db upgrade`; for `alembic` on the command line, the settings decide.
    return config.get_main_option("sqlalchemy.url") or Settings().resolved_database_url


async def _run_online() -> None:
    engine = create_engine(_database_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    existing = config.attributes.get("connection")
    if existing is not None:
        _run(existing)
    else:
        asyncio.run(_run_online())
