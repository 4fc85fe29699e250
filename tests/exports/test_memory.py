"""Memory stays bounded by the page size, not the table's size."""

from __future__ import annotations

import tracemalloc
from datetime import timedelta
from pathlib import Path

from memberhub.exports.jobs import ExportConfig, process_exports
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from tests.exports.conftest import create_local_integration, seed_transactions
from tests.support import ApiClient

ROWS = 60_000
PAGE_ROWS = 2_000
# Python memory held at the peak of the export. The rows as Python objects would take
# more than twice this (about 1 KB each); one page of them takes about 2 MB.
BOUND_BYTES = 24 * 1024 * 1024


async def test_exporting_many_rows_holds_one_page_in_memory(
    api: ApiClient, db: Database, hub: IntegrationHub, tmp_path: Path
) -> None:
    await seed_transactions(db, ROWS)
    storage = await create_local_integration(api, tmp_path / "warehouse")
    definition = {
        "name": "Ledger",
        "table": "point_transactions",
        "storage_integration_id": storage,
    }
    export = (await api.post("/api/v1/exports", definition)).json()
    run = (await api.post(f"/api/v1/exports/{export['id']}/runs")).json()
    config = ExportConfig(part_rows=20_000, page_rows=PAGE_ROWS, time_budget=timedelta(minutes=10))

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        exported = await process_exports(db, hub, utcnow(), config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert exported == ROWS
    done = (await api.get(f"/api/v1/exports/{export['id']}/runs/{run['id']}")).json()
    assert (done["status"], done["rows"], done["parts"]) == ("completed", ROWS, 3)
    assert peak - baseline < BOUND_BYTES, f"peak {(peak - baseline) / 2**20:.1f} MiB"
