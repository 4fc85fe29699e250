"""`memberhub export duckdb FILE`: a local analytics database over the exported files.

The manifests are the source of truth: each table's view reads exactly the files its
manifests list (an incremental export's runs together; a full export's latest run), so a
file left behind by an interrupted run is never counted. Files in a storage integration
are downloaded beside the database first (`FILE.files/`), skipping those already there;
a local directory's files are read in place. Running the command again refreshes it.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

import memberhub.models  # noqa: F401  (every mapper, for the integration lookup)
from memberhub.exports.models import ExportFormat, ExportMode
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_storage, get_provider
from memberhub.integrations.providers.base import Connection, ObjectStorage
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.kit.errors import ValidationFailed
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy

_MANIFEST = re.compile(r"^(?P<table>[a-z_]+)/_manifests/run-(?P<sequence>\d+)\.json$")
_DUCKDB_TYPES = {
    "int64": "BIGINT",
    "string": "VARCHAR",
    "bool": "BOOLEAN",
    "date32[day]": "DATE",
    "timestamp[us, tz=UTC]": "TIMESTAMPTZ",
}
_EARNED = "('earn', 'award', 'activate')"
# Names the manifests give tables and columns become identifiers in the database: only
# plain ones are taken.
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_KEY_PART = re.compile(r"^[A-Za-z0-9_.=:-]{1,200}$")


class ManifestError(ValueError):
    """A manifest that is not one this version wrote: refused with where and why."""


# Views for the usual questions, created when their tables were exported. Points are
# signed as in the ledger: spends and expiries are negative.
KPI_VIEWS: dict[str, tuple[str, str]] = {
    "kpi_points_liability": (
        "point_transactions",
        "SELECT sum(points) AS outstanding_points, sum(pending_points) AS pending_points,"
        " count(DISTINCT member_id) AS members_with_activity FROM point_transactions",
    ),
    "kpi_points_monthly": (
        "point_transactions",
        "SELECT CAST(date_trunc('month', timezone('UTC', occurred_at)) AS DATE) AS month,"
        f" coalesce(sum(points) FILTER (WHERE type IN {_EARNED}), 0) AS points_earned,"
        " coalesce(-sum(points) FILTER (WHERE type = 'redeem'), 0) AS points_redeemed,"
        " coalesce(-sum(points) FILTER (WHERE type = 'expire'), 0) AS points_expired,"
        " count(DISTINCT member_id) AS active_members"
        " FROM point_transactions GROUP BY 1 ORDER BY 1",
    ),
    "kpi_active_members": (
        "point_transactions",
        "SELECT count(DISTINCT member_id) FILTER (WHERE occurred_at >= now() - INTERVAL 30 DAY)"
        " AS active_30_days, count(DISTINCT member_id) FILTER (WHERE occurred_at >= now() -"
        " INTERVAL 90 DAY) AS active_90_days, count(DISTINCT member_id) AS ever_active"
        " FROM point_transactions",
    ),
    "kpi_members_by_status": (
        "members",
        "SELECT status, count(*) AS members FROM members WHERE deleted_at IS NULL"
        " GROUP BY status ORDER BY status",
    ),
}


@dataclass
class TableFiles:
    table: str
    format: str
    schema: list[dict[str, Any]]
    runs: int = 0
    rows: int = 0
    keys: list[str] = field(default_factory=list)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked_manifest(raw: str, where: str, table: str) -> dict[str, Any]:
    """The manifest at `where` (of `table`, as its location says), or ManifestError: the
    names it gives become identifiers and its file keys paths, so nothing else is taken."""

    def refuse(reason: str) -> ManifestError:
        return ManifestError(f"{where} is not an export manifest: {reason}")

    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise refuse(f"not JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise refuse("not a JSON object")
    if manifest.get("table") != table:
        raise refuse(f"its table is {str(manifest.get('table'))[:80]!r}, its location {table!r}")
    if not _IDENTIFIER.match(table):
        raise refuse(f"{table[:80]!r} is not a table name")
    if not _whole(manifest.get("sequence")) or not _whole(manifest.get("rows")):
        raise refuse("sequence and rows must be whole numbers")
    if manifest.get("mode") not in ExportMode.ALL:
        raise refuse(f"mode must be one of {', '.join(ExportMode.ALL)}")
    if manifest.get("format") not in ExportFormat.ALL:
        raise refuse(f"format must be one of {', '.join(ExportFormat.ALL)}")
    schema = manifest.get("schema")
    if not isinstance(schema, list) or not schema:
        raise refuse("schema must list the columns")
    for column in schema:
        if not isinstance(column, dict) or not _IDENTIFIER.match(str(column.get("name"))):
            raise refuse(f"{str(column)[:80]} is not a column with a plain name")
        if column.get("type") not in _DUCKDB_TYPES:
            raise refuse(f"column {column['name']} has an unknown type")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise refuse("files must be a list")
    for file in files:
        key = file.get("key") if isinstance(file, dict) else None
        parts = key.split("/") if isinstance(key, str) else []
        # Under the table's own folder, no step out of it: keys become local paths.
        if (
            len(parts) < 2
            or parts[0] != table
            or any(part in (".", "..") or not _KEY_PART.match(part) for part in parts)
        ):
            raise refuse(f"{str(key)[:120]!r} is not a file of table {table}")
    return manifest


def table_files(manifests: list[dict[str, Any]]) -> dict[str, TableFiles]:
    """Per table, the files its views read, from its manifests in run order."""
    tables: dict[str, TableFiles] = {}
    for manifest in sorted(manifests, key=lambda m: (m["table"], m["sequence"])):
        name = manifest["table"]
        if manifest["mode"] == ExportMode.FULL or name not in tables:
            tables[name] = TableFiles(name, manifest["format"], manifest["schema"])
        entry = tables[name]
        entry.runs += 1
        entry.rows += int(manifest["rows"])
        entry.keys.extend(str(f["key"]) for f in manifest["files"])
    return tables


async def read_manifests(storage: ObjectStorage, connection: Connection) -> list[dict[str, Any]]:
    manifests = []
    with tempfile.TemporaryDirectory(prefix="memberhub-manifests-") as directory:
        for stored in await storage.list_objects(connection, ""):
            match = _MANIFEST.match(stored.key)
            if not match:
                continue
            path = Path(directory) / "manifest.json"
            await storage.download_file(connection, stored.key, path)
            raw = path.read_text(encoding="utf-8", errors="replace")
            manifests.append(checked_manifest(raw, stored.key, match["table"]))
    return manifests


def local_manifests(directory: Path) -> list[dict[str, Any]]:
    return [
        checked_manifest(
            path.read_text(encoding="utf-8", errors="replace"), str(path), path.parent.parent.name
        )
        for path in sorted(directory.glob("*/_manifests/run-*.json"))
    ]


async def download_files(
    storage: ObjectStorage, connection: Connection, tables: dict[str, TableFiles], into: Path
) -> None:
    """Bring the listed files beside the database; files already there are kept (data
    files are never rewritten with other rows under one key once their run finished)."""
    sizes = {o.key: o.size for o in await storage.list_objects(connection, "")}
    for entry in tables.values():
        for key in entry.keys:
            path = into.joinpath(*key.split("/"))
            if path.is_file() and path.stat().st_size == sizes.get(key):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            await storage.download_file(connection, key, path)


async def from_integration(
    db: Database, settings: Settings, public_id: str, into: Path
) -> dict[str, TableFiles]:
    """The tables exported to a storage integration, their files downloaded into `into`."""
    from sqlalchemy import select

    async with db.transaction(read_only=True) as session:
        integration = await session.scalar(
            select(Integration).where(Integration.public_id == public_id)
        )
    provider = get_provider(integration.provider) if integration is not None else None
    storage = as_storage(provider) if provider is not None else None
    if integration is None or storage is None:
        raise ValidationFailed(f"{public_id} is not a storage integration.")
    hub = IntegrationHub(
        db, SecretBox(settings.resolved_secret_key), UrlPolicy.from_settings(settings)
    )
    try:
        connection = hub.connection(integration)
        tables = table_files(await read_manifests(storage, connection))
        await download_files(storage, connection, tables, into)
    finally:
        await hub.aclose()
    return tables


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _reader(entry: TableFiles, root: Path) -> str:
    files = "[" + ", ".join(_quoted(str(root.joinpath(*k.split("/")))) for k in entry.keys) + "]"
    if entry.format == ExportFormat.PARQUET:
        return f"read_parquet({files})"
    columns = (
        "{"
        + ", ".join(
            f"{_quoted(c['name'])}: {_quoted(_DUCKDB_TYPES[c['type']])}" for c in entry.schema
        )
        + "}"
    )
    if entry.format == ExportFormat.CSV:
        return f"read_csv({files}, header = true, columns = {columns})"
    return f"read_json({files}, format = 'newline_delimited', columns = {columns})"


def build(database: Path, tables: dict[str, TableFiles], root: Path) -> list[str]:
    """Create or refresh the views; returns the names created."""
    connection = duckdb.connect(str(database))
    created = []
    try:
        for name, entry in sorted(tables.items()):
            if entry.keys:
                select = f"SELECT * FROM {_reader(entry, root)}"
            else:  # exported, but no rows yet: an empty view with the table's columns
                select = (
                    "SELECT "
                    + ", ".join(
                        f"CAST(NULL AS {_DUCKDB_TYPES[c['type']]}) AS {c['name']}"
                        for c in entry.schema
                    )
                    + " WHERE false"
                )
            connection.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")
            created.append(name)
        for view, (needs, select) in KPI_VIEWS.items():
            if needs in tables:
                connection.execute(f"CREATE OR REPLACE VIEW {view} AS {select}")
                created.append(view)
        connection.execute(
            "CREATE OR REPLACE TABLE memberhub_exports"
            " (table_name VARCHAR, format VARCHAR, runs INTEGER, rows BIGINT, files INTEGER)"
        )
        for name, entry in sorted(tables.items()):
            connection.execute(
                "INSERT INTO memberhub_exports VALUES (?, ?, ?, ?, ?)",
                [name, entry.format, entry.runs, entry.rows, len(entry.keys)],
            )
    finally:
        connection.close()
    return created
