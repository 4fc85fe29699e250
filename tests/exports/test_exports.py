"""Exports end to end: the API queues a run, the worker writes it to a local S3 server,
DuckDB reads it back."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from memberhub.events.models import Event
from memberhub.events.sequencer import run_passes
from memberhub.exports.jobs import process_exports
from memberhub.exports.tables import TABLES, columns
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.ops.retention import purge_expired_history
from tests.exports.conftest import (
    BUCKET,
    SMALL,
    create_local_integration,
    create_s3_integration,
    database_rows,
    parquet_rows,
    seed_transactions,
)
from tests.support import ApiClient, age_the_feed


async def _run(api: ApiClient, db: Database, hub: IntegrationHub, export_id: str) -> dict[str, Any]:
    started = await api.post(f"/api/v1/exports/{export_id}/runs")
    assert started.status_code == 202, started.text
    await process_exports(db, hub, utcnow(), SMALL)
    run = await api.get(f"/api/v1/exports/{export_id}/runs/{started.json()['id']}")
    assert run.status_code == 200
    body: dict[str, Any] = run.json()
    assert body["status"] == "completed", body
    return body


def _download(client: Any, keys: list[str], into: Path) -> list[Path]:
    paths = []
    for key in keys:
        path = into / key.replace("/", "__")
        client.download_file(BUCKET, f"warehouse/{key}", str(path))
        paths.append(path)
    return paths


def _manifest(client: Any, key: str) -> dict[str, Any]:
    body = client.get_object(Bucket=BUCKET, Key=f"warehouse/{key}")["Body"].read()
    manifest: dict[str, Any] = json.loads(body)
    return manifest


async def test_incremental_parquet_export_to_s3_matches_the_database_row_for_row(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    s3_endpoint: str,
    s3_bucket: Any,
    tmp_path: Path,
) -> None:
    await seed_transactions(db, 3000)
    storage = await create_s3_integration(api, s3_endpoint)
    created = await api.post(
        "/api/v1/exports",
        {
            "name": "Ledger to the warehouse",
            "table": "point_transactions",
            "format": "parquet",
            "mode": "incremental",
            "storage_integration_id": storage,
        },
    )
    assert created.status_code == 201, created.text
    export_id = created.json()["id"]

    first = await _run(api, db, hub, export_id)
    assert (first["rows"], first["watermark_from"], first["watermark_to"]) == (3000, None, 3000)
    manifest = _manifest(s3_bucket, first["manifest_key"])
    assert manifest["rows"] == 3000
    assert {f["dt"] for f in manifest["files"]} == {"2026-11-30", "2026-12-01", "2026-12-02"}
    assert all(
        f["key"].startswith(f"point_transactions/dt={f['dt']}/part-") for f in manifest["files"]
    )
    exported = parquet_rows(_download(s3_bucket, [f["key"] for f in manifest["files"]], tmp_path))
    assert exported == await database_rows(db)

    await seed_transactions(db, 700)
    second = await _run(api, db, hub, export_id)
    assert (second["rows"], second["watermark_from"], second["watermark_to"]) == (700, 3000, 3700)
    manifest = _manifest(s3_bucket, second["manifest_key"])
    new_rows = parquet_rows(_download(s3_bucket, [f["key"] for f in manifest["files"]], tmp_path))
    assert new_rows == (await database_rows(db))[3000:]

    third = await _run(api, db, hub, export_id)
    assert (third["rows"], third["watermark_from"], third["watermark_to"]) == (0, 3700, 3700)
    empty = _manifest(s3_bucket, third["manifest_key"])
    assert (empty["rows"], empty["files"]) == (0, [])
    assert [c["name"] for c in empty["schema"]][:2] == ["id", "public_id"]

    async with db.transaction(read_only=True) as session:
        completed = list(
            await session.scalars(
                select(Event).where(Event.type == "export.completed").order_by(Event.id)
            )
        )
    assert [(e.data["run_id"], e.data["rows"]) for e in completed] == [
        (first["id"], 3000),
        (second["id"], 700),
        (third["id"], 0),
    ]
    assert (await api.get(f"/api/v1/exports/{export_id}")).json()["watermark"] == 3700


def test_a_members_data_key_is_never_exported() -> None:
    """Erasing a member deletes the key its audit entries' personal values are sealed with;
    a copy in a warehouse would outlive it."""
    exported = [column.name for column in columns(TABLES["members"])]
    assert "data_key" not in exported
    assert {"id", "public_id", "email", "custom_fields", "deleted_at"} <= set(exported)


def test_the_readme_lists_every_exported_column() -> None:
    """README, Table schemas: each table's key and columns, as the manifests carry them."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Table schemas", 1)[1].split("### ", 1)[0]
    documented = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            names = {cells[1].strip("`"), *re.findall(r"`([a-z_]+)`", cells[3])}
            documented[cells[0].strip("`")] = names
    undocumented = {
        name: sorted({c.name for c in columns(spec)} - documented[name])
        for name, spec in TABLES.items()
        if {c.name for c in columns(spec)} - documented[name]
    }
    assert undocumented == {}


async def _feed(db: Database) -> list[int]:
    async with db.transaction(read_only=True) as session:
        positions = select(Event.position).where(Event.position.is_not(None))
        return list(await session.scalars(positions.order_by(Event.position)))


async def test_a_scheduled_incremental_export_of_the_feed_loses_no_event_to_retention(
    api: ApiClient, db: Database, hub: IntegrationHub, tmp_path: Path
) -> None:
    """The feed's events are purged after RETENTION_DAYS, but not before a scheduled
    incremental export of them has taken them, however long since it last ran."""
    storage = await create_local_integration(api, tmp_path / "warehouse")
    body = {
        "name": "Feed to the warehouse",
        "table": "events",
        "format": "jsonl",
        "mode": "incremental",
        "storage_integration_id": storage,
        "schedule": "0 3 * * *",
    }
    created = await api.post("/api/v1/exports", body)
    assert created.status_code == 201, created.text
    export_id = created.json()["id"]
    await api.create_member()
    await run_passes(db, wait=False)
    first = await _run(api, db, hub, export_id)
    for _ in range(3):
        await api.create_member()
    await run_passes(db, wait=False)
    feed = await _feed(db)
    unexported = [p for p in feed if p > first["watermark_to"]]
    assert len(unexported) >= 3

    # 91 days without a run (the target down, say): nothing it has still to take goes.
    await age_the_feed(db)
    await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    assert (await _feed(db))[-len(unexported) :] == unexported
    assert first["watermark_to"] not in await _feed(db)  # what it took is purged

    second = await _run(api, db, hub, export_id)
    assert second["watermark_from"] == first["watermark_to"]
    assert second["rows"] >= len(unexported)
    await purge_expired_history(db, older_than=utcnow() - timedelta(days=90))
    assert await _feed(db) == [feed[-1]]  # only the newest, which numbers what follows
