"""Uploading a bulk award: what is stored, what is refused, and who may do it."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from memberhub.auth.roles import Role
from memberhub.bulk import service as bulk_service
from memberhub.bulk import upload as upload_module
from memberhub.bulk.models import BulkJobChunk
from memberhub.kit.db import Database
from tests.bulk.conftest import (
    BULK,
    balance,
    csv_body,
    get_job,
    outcomes,
    run_worker,
    stored_counts,
    upload,
    upload_json,
)
from tests.conftest import issue_key
from tests.support import ApiClient


async def test_a_csv_upload_is_queued_in_chunks_and_awards_nothing_yet(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    job = await upload(
        api,
        csv_body(
            "member_id,points,reason,reference_id",
            f"{member['id']},100,Welcome,w-1",
            f"{member['id']},50,Survey,",
        ),
    )
    assert job["id"].startswith("blk_")
    assert (job["status"], job["total_rows"], job["processed_rows"]) == ("queued", 2, 0)
    assert job["progress_percent"] == 0.0
    assert job["links"] == {
        "self": f"{BULK}/{job['id']}",
        "rows": f"{BULK}/{job['id']}/rows",
        "report_csv": f"{BULK}/{job['id']}/rows.csv",
    }
    assert await balance(api, member["id"]) == 0
    async with db.transaction(read_only=True) as session:
        chunks = (await session.scalars(select(BulkJobChunk))).all()
    assert [(c.sequence, c.first_row, c.row_count, c.processed_at) for c in chunks] == [
        (0, 1, 2, None)
    ]
    assert [json.loads(line) for line in chunks[0].rows.split("\n")] == [
        {"member_id": member["id"], "points": "100", "reason": "Welcome", "reference_id": "w-1"},
        {"member_id": member["id"], "points": "50", "reason": "Survey"},
    ]


async def test_the_upload_answers_with_the_job_location(api: ApiClient) -> None:
    member = await api.create_member()
    response = await api.http.post(
        BULK,
        content=csv_body("member_id,points", f"{member['id']},5").encode(),
        params={"reason": "Thanks"},
        headers={"Authorization": f"Bearer {api.key}", "Content-Type": "text/csv; charset=utf-8"},
    )
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"{BULK}/{response.json()['id']}"
    assert response.json()["default_reason"] == "Thanks"


async def test_a_json_upload_takes_its_default_reason_from_the_body(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member(email="Ana@Example.com")
    job = await upload_json(
        api,
        {
            "reason": "Spring campaign",
            "rows": [
                {"member_id": member["id"], "points": 10},
                {"email": "ana@example.com", "points": 20, "reason": "Referral"},
            ],
        },
    )
    assert (job["total_rows"], job["default_reason"]) == (2, "Spring campaign")
    await run_worker(db)
    rows = await outcomes(api, job["id"])
    assert [row["outcome"] for row in rows] == ["applied", "applied"]
    assert await balance(api, member["id"]) == 30


async def test_rows_are_stored_in_chunks_in_file_order(api: ApiClient, db: Database) -> None:
    size = bulk_service.CHUNK_ROWS
    member = await api.create_member()
    lines = [f"{member['id']},{n}" for n in range(1, 2 * size + 101)]
    job = await upload(api, csv_body("member_id,points", *lines), reason="Bonus")
    assert job["total_rows"] == 2 * size + 100
    async with db.transaction(read_only=True) as session:
        chunks = (await session.scalars(select(BulkJobChunk).order_by(BulkJobChunk.sequence))).all()
    assert [(c.sequence, c.first_row, c.row_count) for c in chunks] == [
        (0, 1, size),
        (1, size + 1, size),
        (2, 2 * size + 1, 100),
    ]
    assert json.loads(chunks[2].rows.split("\n")[0])["points"] == str(2 * size + 1)


async def _pieces(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """The bytes as a client streams them: pieces of about `size` bytes, cut anywhere (in a
    line, in a quoted field, in a character's bytes)."""
    for start in range(0, len(data), size - 7):
        yield data[start : start + size - 7]


async def test_a_large_upload_is_read_from_its_file_a_block_at_a_time(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunk records, so that what is measured is how the upload itself is held.
    monkeypatch.setattr(bulk_service, "CHUNK_ROWS", 50)
    member = await api.create_member()
    lines = ["\ufeffmember_id,points,reason,reference_id\r\n"]
    expected: list[dict[str, Any]] = []
    for n in range(1, 9001):
        reason = f"Gift nº {n}, {'é€' * (n % 7)}" + "x" * 900
        if n % 1000 == 0:
            reason += "\nsecond line"
        lines.append(f'{member["id"]},{n},"{reason}",ref-{n}' + ("\r\n" if n % 2 else "\n"))
        expected.append(
            {
                "member_id": member["id"],
                "points": str(n),
                "reason": reason,
                "reference_id": f"ref-{n}",
            }
        )
    body = "".join(lines).encode()
    size = len(body)
    assert size > 8 * 1024 * 1024

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        response = await api.http.post(
            BULK,
            content=_pieces(body),
            headers={"Authorization": f"Bearer {api.key}", "Content-Type": "text/csv"},
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert response.status_code == 202, response.text
    assert response.json()["total_rows"] == 9000
    assert peak - before < size / 4, f"grew by {(peak - before) / 2**20:.1f} MiB"
    async with db.transaction(read_only=True) as session:
        chunks = (await session.scalars(select(BulkJobChunk).order_by(BulkJobChunk.sequence))).all()
    stored = [json.loads(line) for chunk in chunks for line in chunk.rows.split("\n")]
    assert stored == expected


async def test_an_upload_that_is_not_utf8_far_into_the_file_is_refused_with_its_line(
    api: ApiClient, db: Database
) -> None:
    row = f"{(await api.create_member())['id']},1\n".encode()
    body = b"member_id,points\n" + row * 150_000 + b"mem_\xff,1\n" + row * 10
    error = (await upload(api, body, reason="x", expect=422))["error"]
    assert (error["code"], error["details"]["line"]) == ("MALFORMED_UPLOAD", 150_002)
    assert await stored_counts(db) == (0, 0, 0)


async def test_an_upload_repeated_with_its_idempotency_key_is_replayed_not_queued_again(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    reason = "Bonus " + "x" * 800
    body = csv_body(
        "member_id,points,reason", *[f"{member['id']},{n},{reason}" for n in range(3000)]
    )
    assert len(body) > 2 * 1024 * 1024  # received into a file, not memory

    async def send(content: str) -> Any:
        return await api.http.post(
            BULK,
            content=content.encode(),
            headers={
                "Authorization": f"Bearer {api.key}",
                "Content-Type": "text/csv",
                "Idempotency-Key": "upload-1",
            },
        )

    first = await send(body)
    assert first.status_code == 202, first.text
    again = await send(body)
    assert (again.status_code, again.json()["id"]) == (202, first.json()["id"])
    other = await send(body.replace(",2999,", ",3000,"))
    assert other.status_code == 422, other.text
    assert other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert (await stored_counts(db))[0] == 1


# (content type, body, line reported or None, words in the message)
MALFORMED = [
    ("text/csv", "", 1, "header row"),
    ("text/csv", "member_id,points\n", None, "no rows"),
    ("text/csv", "member_id,reason\nmem_a,x\n", 1, "points column"),
    ("text/csv", "points,reason\n5,x\n", 1, "member_id or email"),
    ("text/csv", "member_id,points,colour\nmem_a,5,red\n", 1, "unknown columns"),
    ("text/csv", "member_id,points,points\nmem_a,5,6\n", 1, "repeated columns"),
    ("text/csv", "member_id,points\nmem_a,5\nmem_b,6,7\n", 3, "3 fields"),
    ("text/csv", 'member_id,points\nmem_a,5\n"mem_b"x,6\n', 3, "not valid CSV"),
    ("application/json", "", 1, "JSON object"),
    ("application/json", "[]", 1, "JSON object"),
    ("application/json", '{"reason": "x"}', 1, "rows array"),
    ("application/json", '{"rows": []}', None, "no rows"),
    ("application/json", '{"rows": [\n{"member_id": "mem_a", "points": 1},\n7]}', 3, "row 2"),
    ("application/json", '{"rows": [\n{"member_id": "mem_a", "colour": 1}]}', 2, "unknown"),
    ("application/json", '{"rows": [\n{"member_id": "mem_a",}]}', 2, "not valid JSON"),
    ("application/json", '{"rows": [{"points": 1},\n{"email": ["a"]}]}', 2, "nested value"),
    ("application/json", '{"rows": [{"points": 1}], "extra": 1}', 1, "unknown field"),
    ("application/json", '{"rows": [{"points": 1}]} trailing', 1, "after the JSON"),
    ("application/json", '{"reason": 5, "rows": [{"points": 1}]}', 1, "reason must be"),
    (
        "application/json",
        '{"rows": [{"member_id": "mem_a", "points": 1},\n{"member_id": "mem_b", "points": 1, '
        '"points": 100000}]}',
        2,
        "'points' is repeated",
    ),
]


async def test_a_malformed_upload_is_refused_with_its_line_and_nothing_is_stored(
    api: ApiClient, db: Database
) -> None:
    for content_type, body, line, message in MALFORMED:
        error = (await upload(api, body, content_type=content_type, expect=422))["error"]
        assert error["code"] in ("MALFORMED_UPLOAD", "NO_ROWS"), body
        assert message in error["message"], (body, error)
        if line is not None:
            assert error["details"]["line"] == line, (body, error)
    assert await stored_counts(db) == (0, 0, 0)


async def test_text_that_is_not_utf8_is_refused_with_its_line(api: ApiClient, db: Database) -> None:
    error = (await upload(api, b"member_id,points\nmem_\xff,5\n", expect=422))["error"]
    assert (error["code"], error["details"]["line"]) == ("MALFORMED_UPLOAD", 2)
    assert await stored_counts(db) == (0, 0, 0)


async def test_more_rows_than_the_limit_are_refused_and_nothing_is_stored(
    api: ApiClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert upload_module.MAX_ROWS == 1_000_000
    # The limit is lowered so the test does not build a million-row file.
    monkeypatch.setattr(upload_module, "MAX_ROWS", 3)
    member = await api.create_member()
    rows = [f"{member['id']},1" for _ in range(4)]
    error = (await upload(api, csv_body("member_id,points", *rows), reason="x", expect=413))[
        "error"
    ]
    assert error["code"] == "UPLOAD_TOO_LARGE"
    assert error["details"] == {"max_rows": 3}
    assert await stored_counts(db) == (0, 0, 0)
    await upload(api, csv_body("member_id,points", *rows[:3]), reason="x")


async def test_other_content_types_are_refused(api: ApiClient, db: Database) -> None:
    error = (await upload(api, "member_id,points\n", content_type="text/plain", expect=415))[
        "error"
    ]
    assert error["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert await stored_counts(db) == (0, 0, 0)


async def test_an_invalid_default_reason_is_refused(api: ApiClient, db: Database) -> None:
    member = await api.create_member()
    for reason in ("", "   ", "x" * 1001, "a\x00b"):
        document = {"reason": reason, "rows": [{"member_id": member["id"], "points": 1}]}
        error = (await upload_json(api, document, expect=422))["error"]
        assert error["details"] == {"field": "reason"}, reason
    assert await stored_counts(db) == (0, 0, 0)


async def test_the_default_reason_is_given_once(api: ApiClient, db: Database) -> None:
    member = await api.create_member()
    response = await api.http.post(
        BULK,
        params={"reason": "one"},
        json={"reason": "two", "rows": [{"member_id": member["id"], "points": 1}]},
        headers={"Authorization": f"Bearer {api.key}"},
    )
    assert response.status_code == 422, response.text
    assert await stored_counts(db) == (0, 0, 0)


async def test_bulk_awards_are_for_admin_keys_only(api: ApiClient, db: Database) -> None:
    member = await api.create_member()
    job = await upload(api, csv_body("member_id,points", f"{member['id']},5"), reason="x")
    manager = api.with_key(await issue_key(db, Role.MANAGER))
    response = await manager.http.post(
        BULK,
        content=csv_body("member_id,points", f"{member['id']},5").encode(),
        headers={"Authorization": f"Bearer {manager.key}", "Content-Type": "text/csv"},
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["details"]["required_scope"] == "points:bulk"
    for path in (BULK, f"{BULK}/{job['id']}", f"{BULK}/{job['id']}/rows"):
        assert (await manager.get(path)).status_code == 403
    assert await stored_counts(db) == (1, 1, 0)


async def test_an_organisation_key_awards_only_to_members_it_can_see(
    api: ApiClient, db: Database
) -> None:
    hq = await api.create_organisation()
    chapter = await api.create_organisation(parent_id=hq["id"])
    other = await api.create_organisation()
    inside = await api.create_member(organisation_id=chapter["id"], email="in@example.com")
    outside = await api.create_member(organisation_id=other["id"], email="out@example.com")
    scoped = api.with_key(await issue_key(db, Role.ADMIN, organisation=hq["id"]))
    job = await upload(
        scoped,
        csv_body(
            "member_id,email,points",
            f"{inside['id']},,10",
            f"{outside['id']},,10",
            ",out@example.com,10",
        ),
        reason="Chapter bonus",
    )
    admins_job = await upload(api, csv_body("member_id,points", f"{outside['id']},1"), reason="x")
    await run_worker(db)
    rows = await outcomes(scoped, job["id"])
    assert [(row["outcome"], row["error"]) for row in rows] == [
        ("applied", None),
        ("failed", f"Member {outside['id']} does not exist."),
        ("failed", "No member has the email out@example.com."),
    ]
    assert await balance(api, inside["id"]) == 10
    assert await balance(api, outside["id"]) == 1
    listed = (await scoped.get(BULK)).json()["data"]
    assert [item["id"] for item in listed] == [job["id"]]
    assert (await scoped.get(f"{BULK}/{admins_job['id']}")).status_code == 404
    assert {item["id"] for item in (await api.get(BULK)).json()["data"]} == {
        job["id"],
        admins_job["id"],
    }


async def test_jobs_are_listed_newest_first_and_filtered_by_status(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    first = await upload(api, csv_body("member_id,points", f"{member['id']},1"), reason="x")
    await run_worker(db)
    second = await upload(api, csv_body("member_id,points", f"{member['id']},2"), reason="x")
    page = (await api.get(BULK, {"limit": 1})).json()
    assert [job["id"] for job in page["data"]] == [second["id"]]
    rest = (await api.get(BULK, {"cursor": page["pagination"]["next_cursor"]})).json()
    assert [job["id"] for job in rest["data"]] == [first["id"]]
    completed = (await api.get(BULK, {"status": "completed"})).json()["data"]
    assert [job["id"] for job in completed] == [first["id"]]
    assert (await api.get(BULK, {"status": "done"})).status_code == 422
    assert (await get_job(api, second["id"]))["status"] == "queued"


async def test_an_unknown_job_is_not_found(api: ApiClient) -> None:
    for path in ("", "/rows", "/rows.csv"):
        response = await api.get(f"{BULK}/blk_doesnotexist{path}")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "BULK_JOB_NOT_FOUND"
