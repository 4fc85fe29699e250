"""The outcome report of a bulk award: paged rows and the streamed CSV."""

from __future__ import annotations

import csv
import io

import pytest

from memberhub.bulk import service as bulk_service
from memberhub.kit.db import Database
from tests.bulk.conftest import BULK, csv_body, outcomes, run_worker, upload
from tests.support import ApiClient


async def _mixed_job(api: ApiClient, db: Database) -> tuple[str, str]:
    member = await api.create_member()
    job = await upload(
        api,
        csv_body(
            "member_id,points,reference_id",
            f"{member['id']},10,r-1",
            '=HYPERLINK("http://x"),10,r-2',
            f"{member['id']},10,r-1",
            f"{member['id']},-5,r-4",
            f"{member['id']},20,",
        ),
        reason="Report test",
    )
    await run_worker(db)
    return job["id"], member["id"]


async def test_row_outcomes_are_paged_in_row_order_and_filtered_by_outcome(
    api: ApiClient, db: Database
) -> None:
    job_id, _ = await _mixed_job(api, db)
    first = (await api.get(f"{BULK}/{job_id}/rows", {"limit": 2})).json()
    assert [row["row_number"] for row in first["data"]] == [1, 2]
    assert first["pagination"]["has_more"] is True
    rest = (
        await api.get(f"{BULK}/{job_id}/rows", {"cursor": first["pagination"]["next_cursor"]})
    ).json()
    assert [row["row_number"] for row in rest["data"]] == [3, 4, 5]
    assert [row["row_number"] for row in await outcomes(api, job_id, "failed", limit=1)] == [2, 4]
    assert [row["row_number"] for row in await outcomes(api, job_id, "applied")] == [1, 5]
    assert [row["row_number"] for row in await outcomes(api, job_id, "duplicate")] == [3]
    bad = await api.get(f"{BULK}/{job_id}/rows", {"outcome": "skipped"})
    assert bad.status_code == 422, bad.text


async def test_the_csv_report_streams_every_row_in_pages(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_service, "REPORT_PAGE", 2)
    job_id, member_id = await _mixed_job(api, db)
    response = await api.get(f"{BULK}/{job_id}/rows.csv")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert f'filename="{job_id}-rows.csv"' in response.headers["content-disposition"]
    lines = list(csv.reader(io.StringIO(response.text)))
    assert lines[0] == list(bulk_service.REPORT_COLUMNS)
    assert [(line[0], line[1], line[2], line[3]) for line in lines[1:]] == [
        ("1", "applied", member_id, "10"),
        ("2", "failed", '\'=HYPERLINK("http://x")', "10"),
        ("3", "duplicate", member_id, "10"),
        ("4", "failed", member_id, ""),
        ("5", "applied", member_id, "20"),
    ]
    assert lines[1][4:6] == ["r-1", lines[3][5]]
    assert lines[4][6] == "points must be a whole number from 1 to 1000000000000."


async def test_the_csv_report_can_hold_only_one_outcome(api: ApiClient, db: Database) -> None:
    job_id, _ = await _mixed_job(api, db)
    response = await api.get(f"{BULK}/{job_id}/rows.csv", {"outcome": "failed"})
    assert response.status_code == 200, response.text
    lines = list(csv.reader(io.StringIO(response.text)))
    assert [line[0] for line in lines[1:]] == ["2", "4"]


async def test_a_formula_behind_leading_spaces_is_text_in_the_csv_report(
    api: ApiClient, db: Database
) -> None:
    # A spreadsheet trims the spaces, then runs what follows as a formula.
    job = await upload(
        api,
        csv_body(
            "member_id,points,reference_id",
            '"  =HYPERLINK(""http://x"")",10,"  @SUM(1)"',
            '"\t-1+1",10,r-2',
        ),
        reason="Report test",
    )
    await run_worker(db)
    response = await api.get(f"{BULK}/{job['id']}/rows.csv")
    assert response.status_code == 200, response.text
    lines = list(csv.reader(io.StringIO(response.text)))
    assert [(line[2], line[4]) for line in lines[1:]] == [
        ('\'  =HYPERLINK("http://x")', "'  @SUM(1)"),
        ("'\t-1+1", "r-2"),
    ]
