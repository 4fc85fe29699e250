"""`memberhub export duckdb`: views over the exported files, and KPI views, that agree
with the database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from memberhub.cli import app as cli_app
from memberhub.exports.jobs import process_exports
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.points.models import PointTransaction
from tests.conftest import TEST_SECRET_KEY
from tests.exports.conftest import (
    SMALL,
    create_local_integration,
    create_s3_integration,
    seed_transactions,
)
from tests.support import ApiClient

MEMBERHUB = str(Path(sys.executable).with_name("memberhub"))


async def _export(
    api: ApiClient, db: Database, hub: IntegrationHub, storage: str, table: str, **extra: Any
) -> str:
    definition = {"name": table, "table": table, "storage_integration_id": storage, **extra}
    export = (await api.post("/api/v1/exports", definition)).json()
    run = (await api.post(f"/api/v1/exports/{export['id']}/runs")).json()
    await process_exports(db, hub, utcnow(), SMALL)
    done = (await api.get(f"/api/v1/exports/{export['id']}/runs/{run['id']}")).json()
    assert done["status"] == "completed", done
    return str(export["id"])


async def _ledger_totals(db: Database) -> tuple[int, int, int]:
    async with db.transaction(read_only=True) as session:
        total = await session.scalar(select(func.sum(PointTransaction.points)))
        redeemed = await session.scalar(
            select(-func.sum(PointTransaction.points)).where(PointTransaction.type == "redeem")
        )
        count = await session.scalar(select(func.count()).select_from(PointTransaction))
    return int(total or 0), int(redeemed or 0), int(count or 0)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MEMBERHUB, "export", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _query(database: Path, sql: str) -> list[tuple[Any, ...]]:
    connection = duckdb.connect(str(database), read_only=True)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


async def test_a_local_directory_becomes_views_and_kpis_matching_the_database(
    api: ApiClient, db: Database, hub: IntegrationHub, tmp_path: Path
) -> None:
    directory = tmp_path / "warehouse"
    storage = await create_local_integration(api, directory)
    await seed_transactions(db, 2000)
    ledger = await _export(api, db, hub, storage, "point_transactions")
    await seed_transactions(db, 500)
    assert (await api.post(f"/api/v1/exports/{ledger}/runs")).status_code == 202
    await process_exports(db, hub, utcnow(), SMALL)
    await _export(api, db, hub, storage, "members", format="csv", mode="full")
    await _export(api, db, hub, storage, "leads", format="jsonl")  # no leads: an empty view
    database = tmp_path / "analytics.duckdb"

    result = CliRunner().invoke(
        cli_app, ["export", "duckdb", str(database), "--from", str(directory)]
    )

    assert result.exit_code == 0, result.output
    total, redeemed, count = await _ledger_totals(db)
    assert _query(database, "SELECT count(*), count(DISTINCT id) FROM point_transactions") == [
        (count, count)
    ]
    assert _query(database, "SELECT outstanding_points FROM kpi_points_liability") == [(total,)]
    assert _query(database, "SELECT sum(points_redeemed) FROM kpi_points_monthly") == [(redeemed,)]
    assert _query(database, "SELECT * FROM kpi_members_by_status") == [("active", 50)]
    assert _query(database, "SELECT count(*) FROM leads") == [(0,)]
    assert _query(database, "SELECT table_name, runs FROM memberhub_exports ORDER BY 1") == [
        ("leads", 1),
        ("members", 1),
        ("point_transactions", 2),
    ]


async def test_a_storage_integration_is_downloaded_beside_the_database(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    database_url: str,
    s3_endpoint: str,
    s3_bucket: Any,
    tmp_path: Path,
) -> None:
    storage = await create_s3_integration(api, s3_endpoint)
    await seed_transactions(db, 1500)
    await _export(api, db, hub, storage, "point_transactions")
    database = tmp_path / "analytics.duckdb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERHUB_")}
    env.update(
        MEMBERHUB_DATABASE_URL=database_url,
        MEMBERHUB_DATA_DIR=str(tmp_path / "data"),
        MEMBERHUB_SECRET_KEY=TEST_SECRET_KEY,
        MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        MEMBERHUB_WEBHOOK_ALLOW_HTTP="true",
    )

    completed = await asyncio.to_thread(_cli, env, "duckdb", str(database), "--from", storage)

    assert completed.returncode == 0, completed.stderr
    assert "point_transactions: 1500 rows" in completed.stdout
    assert (tmp_path / "analytics.duckdb.files" / "point_transactions").is_dir()
    total, _, count = await _ledger_totals(db)
    assert _query(database, "SELECT count(*) FROM point_transactions") == [(count,)]
    assert _query(database, "SELECT outstanding_points FROM kpi_points_liability") == [(total,)]


def test_a_source_that_is_neither_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli_app, ["export", "duckdb", str(tmp_path / "a.duckdb"), "--from", str(tmp_path / "no")]
    )
    assert result.exit_code == 1


def _manifest_folder(tmp_path: Path, manifest: dict[str, Any] | str, table: str) -> Path:
    root = tmp_path / "exports"
    part = root / "leads" / "dt=2026-12-07" / "part-000001-00001.csv"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text("id\nmem_1\n")
    folder = root / table / "_manifests"
    folder.mkdir(parents=True, exist_ok=True)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (folder / "run-000001.json").write_text(text)
    return root


MANIFEST: dict[str, Any] = {
    "table": "leads",
    "sequence": 1,
    "mode": "full",
    "format": "csv",
    "rows": 1,
    "schema": [{"name": "id", "type": "string"}],
    "files": [{"key": "leads/dt=2026-12-07/part-000001-00001.csv", "rows": 1}],
}
OUTSIDE = "COPY (SELECT 42 AS x) TO 'outside.csv'"


@pytest.mark.parametrize(
    ("table", "manifest", "reason"),
    [
        ("leads", {**MANIFEST, "table": f"z AS SELECT 1; {OUTSIDE}; CREATE VIEW w"}, "table"),
        (f"z AS SELECT 1; {OUTSIDE}", {**MANIFEST, "table": f"z AS SELECT 1; {OUTSIDE}"}, "name"),
        (
            "leads",
            {**MANIFEST, "schema": [{"name": f"id; {OUTSIDE}", "type": "string"}]},
            "plain name",
        ),
        ("leads", {**MANIFEST, "files": [{"key": "leads/../../stolen.csv"}]}, "not a file"),
        ("leads", {**MANIFEST, "files": [{"key": "/etc/passwd"}]}, "not a file"),
        ("leads", {k: v for k, v in MANIFEST.items() if k != "sequence"}, "whole numbers"),
        ("leads", {**MANIFEST, "format": "xlsx"}, "format"),
        ("leads", "{", "not JSON"),
        ("leads", "[]", "not a JSON object"),
    ],
)
def test_a_manifest_this_version_did_not_write_is_refused_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    table: str,
    manifest: dict[str, Any] | str,
    reason: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    root = _manifest_folder(tmp_path, manifest, table)
    database = tmp_path / "a.duckdb"
    result = CliRunner().invoke(cli_app, ["export", "duckdb", str(database), "--from", str(root)])
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: "), line
    assert "is not an export manifest" in line, line
    assert reason in line
    assert not (tmp_path / "outside.csv").exists()
    assert not database.exists(), "nothing is built from a refused manifest"


def test_the_manifest_those_cases_alter_builds(tmp_path: Path) -> None:
    root = _manifest_folder(tmp_path, MANIFEST, "leads")
    database = tmp_path / "a.duckdb"
    result = CliRunner().invoke(cli_app, ["export", "duckdb", str(database), "--from", str(root)])
    assert result.exit_code == 0, result.output
    assert _query(database, "SELECT id FROM leads") == [("mem_1",)]


def test_a_file_that_is_not_a_duckdb_database_is_refused_in_one_line(tmp_path: Path) -> None:
    root = _manifest_folder(tmp_path, MANIFEST, "leads")
    database = tmp_path / "notes.txt"
    database.write_text("not a database\n" * 100)
    result = CliRunner().invoke(cli_app, ["export", "duckdb", str(database), "--from", str(root)])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ")
    assert database.read_text() == "not a database\n" * 100
