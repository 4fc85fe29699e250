"""Leads in bulk: imports with a result per record, streamed exports."""

from __future__ import annotations

import asyncio
import csv
import gc
import io
import json
import resource
from typing import Any

import pytest
from sqlalchemy import insert, update

from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.leads import transfer
from memberhub.leads.models import Lead
from tests.support import ApiClient

IMPORT = "/api/v1/external/leads/import"
EXPORT = "/api/v1/external/leads/export"


def record(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "external_id": f"SF-{n}",
        "first_name": "Lead",
        "last_name": f"No{n}",
        "email": f"lead{n}@example.com",
        **fields,
    }


async def test_an_import_stores_the_valid_records_and_reports_each_invalid_one(
    api: ApiClient,
) -> None:
    records: list[Any] = [record(n) for n in range(10_000)]
    invalid = {n: records[n] for n in range(0, 10_000, 100)}  # 1%
    for n in invalid:
        records[n] = (
            {**record(n), "email": "not-an-email"} if n % 200 else {"first_name": "No way to match"}
        )
    records[9_999] = "not an object"

    response = await api.post(IMPORT, {"source": "salesforce", "leads": records})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["created"], body["updated"], body["failed"]) == (9899, 0, 101)
    failed = {r["index"]: r["errors"] for r in body["results"] if r["outcome"] == "failed"}
    assert sorted(failed) == [*sorted(invalid), 9_999]
    assert failed[100] == [{"field": "email", "message": failed[100][0]["message"]}]
    assert failed[200] == [{"field": "record", "message": "needs an external_id or an email"}]
    assert len(body["results"]) == len(records)

    listed = await api.get("/api/v1/leads", params={"email": "lead1@example.com"})
    [lead] = listed.json()["data"]
    assert lead["external_ids"] == {"salesforce": "SF-1"}
    assert (lead["source"], lead["status"]) == ("salesforce", "new")


async def test_a_second_import_matches_by_external_id_then_email_and_never_duplicates(
    api: ApiClient,
) -> None:
    first = await api.post(IMPORT, {"source": "salesforce", "leads": [record(1), record(2)]})
    assert first.json()["created"] == 2
    by_email = await api.post("/api/v1/leads", {"email": "known@example.com"})
    known_id = by_email.json()["id"]

    again = await api.post(
        IMPORT,
        {
            "source": "salesforce",
            "leads": [
                record(1),  # unchanged
                record(2, email="renamed@example.com", status="contacted"),  # new email
                {"external_id": "SF-9", "email": "KNOWN@example.com", "phone": "555-0100"},
                record(3),
                record(3, first_name="Twice"),  # the same lead twice in one import
            ],
        },
    )
    body = again.json()
    assert [r["outcome"] for r in body["results"]] == [
        "unchanged",
        "updated",
        "updated",
        "created",
        "updated",
    ]
    assert body["results"][2]["lead_id"] == known_id
    assert body["results"][3]["lead_id"] == body["results"][4]["lead_id"]
    leads = (await api.get("/api/v1/leads", params={"limit": 500})).json()["data"]
    assert len(leads) == 4
    renamed = next(lead for lead in leads if lead["external_ids"].get("salesforce") == "SF-2")
    assert (renamed["email"], renamed["status"]) == ("renamed@example.com", "contacted")
    known = next(lead for lead in leads if lead["id"] == known_id)
    assert known["external_ids"] == {"salesforce": "SF-9"}


async def test_two_records_of_one_system_sharing_an_email_stay_two_leads(
    api: ApiClient,
) -> None:
    shared = "shared@example.com"
    response = await api.post(
        IMPORT,
        {"source": "pipedrive", "leads": [record(1, email=shared), record(2, email=shared)]},
    )
    assert [r["outcome"] for r in response.json()["results"]] == ["created", "created"]
    again = await api.post(
        IMPORT, {"source": "pipedrive", "leads": [record(1, email=shared, phone="555-0101")]}
    )
    assert again.json()["results"][0]["outcome"] == "updated"
    leads = (await api.get("/api/v1/leads", params={"email": shared})).json()["data"]
    assert sorted(lead["external_ids"]["pipedrive"] for lead in leads) == ["SF-1", "SF-2"]


async def test_a_refused_status_move_fails_only_that_record(api: ApiClient) -> None:
    await api.post(IMPORT, {"source": "hubspot", "leads": [record(1, status="lost")]})
    response = await api.post(
        IMPORT,
        {"source": "hubspot", "leads": [record(1, status="qualified"), record(2)]},
    )
    body = response.json()
    assert [r["outcome"] for r in body["results"]] == ["failed", "created"]
    assert "cannot become qualified" in body["results"][0]["errors"][0]["message"]


async def test_imports_at_once_naming_one_email_make_one_lead(api: ApiClient) -> None:
    for round_number in range(3):
        email = f"dup{round_number}@example.com"
        bodies = [
            {"source": "sf", "leads": [{"email": email.upper() if index % 2 else email}]}
            for index in range(4)
        ]

        answers = await asyncio.gather(*(api.post(IMPORT, body) for body in bodies))

        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        assert sorted(a.json()["created"] for a in answers) == [0, 0, 0, 1]
        leads = (await api.get("/api/v1/leads", params={"email": email})).json()["data"]
        assert len(leads) == 1


async def test_a_record_matches_by_the_email_a_lead_has_not_one_it_had(api: ApiClient) -> None:
    first = await api.post(
        IMPORT, {"source": "sf", "leads": [{"external_id": "1", "email": "old@example.com"}]}
    )
    assert first.json()["created"] == 1
    # One batch: the lead moves to a new address, then another record gives the old one.
    moved = await api.post(
        IMPORT,
        {
            "source": "sf",
            "leads": [
                {"external_id": "1", "email": "new@example.com"},
                {"email": "old@example.com", "first_name": "Other"},
            ],
        },
    )

    assert [r["outcome"] for r in moved.json()["results"]] == ["updated", "created"]
    leads = (await api.get("/api/v1/leads")).json()["data"]
    assert sorted((lead["email"], lead["first_name"]) for lead in leads) == [
        ("new@example.com", None),
        ("old@example.com", "Other"),
    ]


async def test_imported_custom_fields_merge_as_a_patch_does_within_the_limit(
    api: ApiClient,
) -> None:
    first = {f"a{n}": n for n in range(50)}
    created = await api.post(
        IMPORT, {"source": "hubspot", "leads": [record(1, custom_fields=first)]}
    )
    assert created.json()["results"][0]["outcome"] == "created", created.text
    lead_id = created.json()["results"][0]["lead_id"]
    more = {f"b{n}": n for n in range(50)}
    over = await api.post(
        IMPORT,
        {"source": "hubspot", "leads": [record(1, custom_fields=more, first_name="Changed")]},
    )
    (result,) = over.json()["results"]
    assert result["outcome"] == "failed"
    assert "at most 50" in result["errors"][0]["message"]
    lead = (await api.get(f"/api/v1/leads/{lead_id}")).json()
    assert (lead["custom_fields"], lead["first_name"]) == (first, "Lead"), (
        "the record changed nothing"
    )
    # A null removes a key, as in a PATCH, and the lead still becomes a member.
    dropped = {"a0": None, "b0": 0}
    again = await api.post(
        IMPORT, {"source": "hubspot", "leads": [record(1, custom_fields=dropped)]}
    )
    assert again.json()["results"][0]["outcome"] == "updated", again.text
    lead = (await api.get(f"/api/v1/leads/{lead_id}")).json()
    assert "a0" not in lead["custom_fields"]
    assert lead["custom_fields"]["b0"] == 0
    assert len(lead["custom_fields"]) == 50
    enrolled = await api.post(f"/api/v1/leads/{lead_id}/enroll", {})
    assert enrolled.status_code == 201, enrolled.text


async def test_a_lead_holding_what_a_member_may_not_is_refused_enrolment_clearly(
    api: ApiClient, db: Database
) -> None:
    created = await api.post(IMPORT, {"source": "hubspot", "leads": [record(8)]})
    lead_id = created.json()["results"][0]["lead_id"]
    async with db.transaction() as session:  # as an earlier version could leave it
        await session.execute(
            update(Lead)
            .where(Lead.public_id == lead_id)
            .values(custom_fields={f"k{n}": n for n in range(60)})
        )
    refused = await api.post(f"/api/v1/leads/{lead_id}/enroll", {})
    assert refused.status_code == 422, refused.text
    assert "custom_fields" in refused.json()["error"]["message"]
    assert (await api.get(f"/api/v1/leads/{lead_id}")).json()["status"] == "new"


async def test_a_null_custom_field_on_a_new_lead_sets_nothing(api: ApiClient) -> None:
    fields = {"kept": "yes", "empty": None}
    created = await api.post(
        IMPORT, {"source": "hubspot", "leads": [record(7, custom_fields=fields)]}
    )
    lead_id = created.json()["results"][0]["lead_id"]
    assert (await api.get(f"/api/v1/leads/{lead_id}")).json()["custom_fields"] == {"kept": "yes"}


async def test_an_empty_or_oversized_import_is_refused(api: ApiClient) -> None:
    empty = await api.post(IMPORT, {"source": "salesforce", "leads": []})
    assert empty.status_code == 422
    bad_source = await api.post(IMPORT, {"source": "Sales Force!", "leads": [record(1)]})
    assert bad_source.status_code == 422


async def test_exports_stream_every_matching_lead_as_json_or_csv(
    api: ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "EXPORT_PAGE", 7)  # several pages, and a boundary
    records = [record(n) for n in range(30)]
    records[3] = record(3, status="qualified", first_name="=HYPERLINK()")
    assert (await api.post(IMPORT, {"source": "salesforce", "leads": records})).is_success

    as_json = await api.get(EXPORT)
    assert as_json.status_code == 200
    leads = json.loads(as_json.text)["leads"]
    assert [lead["external_ids"]["salesforce"] for lead in leads] == [f"SF-{n}" for n in range(30)]
    qualified = await api.get(EXPORT, params={"status": "qualified", "format": "csv"})
    assert qualified.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(qualified.text)))
    assert [row["email"] for row in rows] == ["lead3@example.com"]
    assert rows[0]["first_name"] == "'=HYPERLINK()"  # never a formula in a spreadsheet
    assert json.loads(rows[0]["external_ids"]) == {"salesforce": "SF-3"}

    everything = list(csv.DictReader(io.StringIO((await api.get(EXPORT, params={
        "format": "csv", "date_from": "2000-01-01"})).text)))  # fmt: skip
    assert len(everything) == 30
    none_yet = await api.get(EXPORT, params={"date_from": "2999-01-01"})
    assert json.loads(none_yet.text) == {"leads": []}
    assert (await api.get(EXPORT, params={"format": "xml"})).status_code == 422


async def test_forty_thousand_leads_export_as_csv_in_bounded_memory(db: Database) -> None:
    """The export holds one page of leads at a time: its peak memory stays a small part of
    what it sends."""
    total = 40_000
    now = utcnow()
    async with db.transaction() as session:
        for start in range(0, total, 5_000):
            await session.execute(
                insert(Lead),
                [
                    {
                        "public_id": f"led_bulk{n:012d}",
                        "email": f"bulk{n}@example.com",
                        "email_normalized": f"bulk{n}@example.com",
                        "first_name": f"First{n}",
                        "last_name": f"Last{n}",
                        "status": "new",
                        "source": "import",
                        "custom_fields": {"interest": "high"},
                        "external_ids": {"salesforce": f"SF-{n}"},
                        "version": 1,
                        "status_changed_at": now,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for n in range(start, start + 5_000)
                ],
            )
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sent = 0
    rows = 0
    async for chunk in transfer.export_lines(db, None, None, None, "csv"):
        sent += len(chunk)
        rows += chunk.count("\n")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert rows == total + 1  # and the header
    assert sent > 6_000_000
    # Holding every lead (as rows, objects or text) would need several times what was sent.
    assert grown < sent, f"the process grew by {grown} bytes to send {sent}"


async def test_an_export_writes_every_text_a_spreadsheet_would_run_as_text(
    api: ApiClient,
) -> None:
    # Lead text is stripped when stored, so a formula behind spaces arrives without them.
    formulas = {"first_name": "  +1+1", "last_name": '=HYPERLINK("http://x")', "phone": "-123"}
    imported = await api.post(IMPORT, {"source": "salesforce", "leads": [record(1, **formulas)]})
    assert imported.json()["results"][0]["outcome"] == "created", imported.text
    exported = await api.get(EXPORT, params={"format": "csv"})
    (row,) = csv.DictReader(io.StringIO(exported.text))
    assert (row["first_name"], row["last_name"], row["phone"]) == (
        "'+1+1",
        '\'=HYPERLINK("http://x")',
        "'-123",
    ), row
