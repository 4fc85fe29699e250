"""Run the Alembic migrations shipped inside the package."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from memberhub.kit.db import create_engine


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent.parent / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade(database_url: str, revision: str = "head") -> list[tuple[str, str]]:
    """Apply migrations up to `revision`; the (revision, description) of each applied."""
    config = alembic_config(database_url)
    command.upgrade(config, revision)
    return list(config.attributes.get("applied", []))


def current(database_url: str) -> list[str]:
    """The revisions the database is at; [] when it was never migrated."""

    async def read() -> list[str]:
        engine = create_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as connection:
                heads = await connection.run_sync(
                    lambda sync: MigrationContext.configure(sync).get_current_heads()
                )
        finally:
            await engine.dispose()
        return list(heads)

    return asyncio.run(read())


def head() -> str:
    """The newest revision the package ships."""
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    return ", ".join(heads)


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema is against the revisions this version ships."""

    at: tuple[str, ...]
    newest: str
    # Revisions the database is at that this version does not ship: a newer version
    # migrated it (as during a rolling upgrade, before this process is replaced).
    unknown: tuple[str, ...]

    @property
    def never_migrated(self) -> bool:
        return not self.at

    @property
    def behind(self) -> bool:
        """Migrations this version ships are not applied yet."""
        return bool(self.at) and not self.unknown and self.newest not in self.at


def shipped() -> frozenset[str]:
    """Every revision the package ships."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return frozenset(revision.revision for revision in script.walk_revisions())


def schema_state(database_url: str) -> SchemaState:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    known = shipped()
    at = tuple(current(database_url))
    return SchemaState(
        at=at,
        newest=", ".join(script.get_heads()),
        unknown=tuple(revision for revision in at if revision not in known),
    )


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade, database_url, revision)
