"""A run that fails for good leaves none of its files behind: a Hive-style reader of the
folder never counts a row twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from memberhub.exports import jobs
from memberhub.exports.jobs import process_exports
from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.providers.local_storage import LocalStorage
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.exports.conftest import SMALL, create_local_integration, seed_transactions
from tests.support import ApiClient

ROWS = 600


def _stored(directory: Path) -> tuple[list[str], int]:
    """The Parquet files under the table's dt= folders, and the rows they hold."""
    files = sorted(directory.glob("point_transactions/dt=*/*.parquet"))
    return [f.name for f in files], sum(pq.read_metadata(f).num_rows for f in files)


@pytest.mark.parametrize("mode", ["full", "incremental"])
async def test_a_run_that_failed_for_good_leaves_no_rows_to_count_twice(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    await seed_transactions(db, ROWS)
    directory = tmp_path / "warehouse"
    storage = await create_local_integration(api, directory)
    created = await api.post(
        "/api/v1/exports",
        {
            "name": "Ledger",
            "table": "point_transactions",
            "mode": mode,
            "storage_integration_id": storage,
        },
    )
    assert created.status_code == 201, created.text
    runs = f"/api/v1/exports/{created.json()['id']}/runs"
    # The parts upload; the manifest cannot be stored (the target fails at that moment),
    # every attempt, until the run fails.
    upload = LocalStorage.upload_file

    async def manifest_refused(
        self: LocalStorage, connection: Any, key: str, *a: Any, **kw: Any
    ) -> Any:
        if "/_manifests/" in key:
            raise OSError("storage unreachable")
        return await upload(self, connection, key, *a, **kw)

    monkeypatch.setattr(LocalStorage, "upload_file", manifest_refused)
    failing = (await api.post(runs)).json()
    for _ in range(jobs.MAX_FAILURES):
        await process_exports(db, hub, utcnow(), SMALL)
    assert (await api.get(f"{runs}/{failing['id']}")).json()["status"] == "failed"
    assert _stored(directory) == ([], 0)
    monkeypatch.undo()

    finished = (await api.post(runs)).json()
    await process_exports(db, hub, utcnow(), SMALL)
    assert (await api.get(f"{runs}/{finished['id']}")).json()["status"] == "completed"
    names, rows = _stored(directory)
    assert rows == ROWS
    assert all(name.startswith("part-000002-") for name in names), names
