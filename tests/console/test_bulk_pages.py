"""The bulk awards pages: a CSV uploaded from the console becomes the API's job, the job page
and the report match the API once the worker has run, and the upload is refused (nothing
stored) without the scope, without the CSRF token, or when it is not a usable CSV."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from memberhub.auth.roles import Role
from memberhub.bulk.models import BulkJob
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.bulk.conftest import BULK, csv_body, get_job, run_worker
from tests.conftest import issue_key
from tests.console.support import create_staff_user, csrf_of, sign_in
from tests.support import ApiClient

PAGE = "/console/bulk-awards"
FORM_LIMIT = 16 * 1024
UPLOAD_LIMIT = 64 * 1024


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Small limits, so that neither the large nor the oversized upload needs a large file.
    return settings.model_copy(
        update={"max_body_bytes": FORM_LIMIT, "bulk_upload_max_bytes": UPLOAD_LIMIT}
    )


async def upload_csv(
    browser: httpx.AsyncClient,
    content: bytes,
    *,
    filename: str = "awards.csv",
    content_type: str = "text/csv",
    reason: str = "",
    token: str | None = "from the page",
) -> httpx.Response:
    """Post the upload form as a browser does: multipart, the CSRF token a form field."""
    fields: dict[str, str] = {"reason": reason}
    if token == "from the page":
        fields["csrf_token"] = csrf_of(await browser.get(PAGE))
    elif token is not None:
        fields["csrf_token"] = token
    return await browser.post(PAGE, data=fields, files={"file": (filename, content, content_type)})


async def job_count(db: Database) -> int:
    async with db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(BulkJob)) or 0)


def cell(page: httpx.Response, element_id: str) -> str:
    start = page.text.index(f'id="{element_id}">') + len(f'id="{element_id}">')
    return page.text[start : page.text.index("</dd>", start)]


async def three_awards(api: ApiClient) -> tuple[bytes, list[dict[str, Any]]]:
    members = [await api.create_member() for _ in range(2)]
    body = csv_body(
        "member_id,points,reason",
        f"{members[0]['id']},100,Volunteering",
        f"{members[1]['id']},250,",
        "mbr_doesnotexist,10,Nobody",
    )
    return body.encode(), members


async def test_an_uploaded_csv_becomes_the_apis_job_and_its_page_and_report_match_the_api(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    staff_id = await create_staff_user(db)
    await sign_in(browser)
    body, members = await three_awards(api)

    answered = await upload_csv(browser, body, reason="Annual meeting")

    assert answered.status_code == 303, answered.text
    job_path = answered.headers["location"]
    job_id = job_path.rsplit("/", 1)[1]
    listed = (await api.get(BULK)).json()["data"]
    assert [(j["id"], j["status"], j["total_rows"]) for j in listed] == [(job_id, "queued", 3)]
    assert listed[0]["created_by"] == staff_id
    assert listed[0]["default_reason"] == "Annual meeting"
    queued = await browser.get(job_path)
    assert "queued with 3 rows" in queued.text
    assert cell(queued, "job-status") == "queued"
    assert queued.headers["refresh"] == "5"

    await run_worker(db)

    done = await browser.get(job_path)
    job = await get_job(api, job_id)
    assert job["status"] == "completed"
    assert cell(done, "job-status") == "completed"
    assert cell(done, "job-progress").startswith(f"{job['processed_rows']} of {job['total_rows']}")
    assert cell(done, "job-applied") == str(job["applied_rows"]) == "2"
    assert cell(done, "job-failed") == str(job["failed_rows"]) == "1"
    assert cell(done, "job-duplicates") == str(job["duplicate_rows"])
    assert "refresh" not in done.headers
    assert "mbr_doesnotexist" in done.text
    report = await browser.get(f"{job_path}/rows.csv")
    from_api = await api.get(f"{BULK}/{job_id}/rows.csv")
    assert report.status_code == 200
    assert report.headers["content-type"].startswith("text/csv")
    assert report.headers["content-disposition"] == f'attachment; filename="{job_id}-rows.csv"'
    assert report.text == from_api.text
    assert len(report.text.splitlines()) == 4
    listing = await browser.get(PAGE)
    assert f'href="/console/bulk-awards/{job_id}"' in listing.text
    balances = [(await api.get(f"/api/v1/members/{m['id']}/points")).json() for m in members]
    assert [b["current_balance"] for b in balances] == [100, 250]


async def test_a_large_upload_is_received_within_the_bulk_limit_not_the_form_limit(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, app: Any
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    member = await api.create_member()
    assert app.state.settings.max_body_bytes == FORM_LIMIT
    lines = ["member_id,points,reference_id"]
    size = 0
    while size <= FORM_LIMIT + 1024:
        line = f"{member['id']},1,ref-{len(lines):08d}-{'x' * 40}"
        lines.append(line)
        size += len(line) + 1

    answered = await upload_csv(browser, csv_body(*lines).encode())

    assert answered.status_code == 303, answered.text
    job_id = answered.headers["location"].rsplit("/", 1)[1]
    assert (await get_job(api, job_id))["total_rows"] == len(lines) - 1


async def test_an_upload_over_the_bulk_limit_is_refused_with_a_clear_page_and_stores_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    member = await api.create_member()
    too_many = csv_body("member_id,points", *[f"{member['id']},1"] * 5000).encode()
    assert len(too_many) > UPLOAD_LIMIT

    refused = await upload_csv(browser, too_many)

    assert refused.status_code == 413, refused.text
    assert "larger than 65,536 bytes" in refused.text
    assert await job_count(db) == 0


async def test_an_upload_streamed_without_a_length_is_cut_off_at_the_bulk_limit(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    member = await api.create_member()
    token = csrf_of(await browser.get(PAGE))
    boundary = "console-upload-boundary"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="csrf_token"\r\n\r\n'
        f"{token}\r\n"
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="awards.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
        "member_id,points\r\n"
    ).encode()
    row = f"{member['id']},1\n".encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        for _ in range(UPLOAD_LIMIT // 1024 + 2):
            yield row * (1024 // len(row) + 1)
        yield f"\r\n--{boundary}--\r\n".encode()

    refused = await browser.post(
        PAGE,
        content=chunks(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )

    assert refused.status_code == 413, refused.text
    assert f"larger than {UPLOAD_LIMIT:,} bytes" in refused.text
    assert await job_count(db) == 0


@pytest.mark.parametrize(
    ("filename", "content", "content_type", "status", "message"),
    [
        ("awards.csv", b"", "text/csv", 422, "The file is empty"),
        ("awards.csv", b"member_id,points\n", "text/csv", 422, "no rows"),
        ("photo.png", b"\x89PNG\r\n\x1a\n\x00\x00", "image/png", 422, "Choose a CSV file"),
        ("awards.csv", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "text/csv", 422, "not UTF-8 text"),
        ("awards.csv", b"name,amount\nAna,5\n", "text/csv", 422, "unknown columns"),
        ("", b"", "application/octet-stream", 422, "Choose a CSV file to upload"),
    ],
)
async def test_an_upload_that_is_not_a_usable_csv_is_refused_clearly_and_stores_nothing(
    browser: httpx.AsyncClient,
    db: Database,
    filename: str,
    content: bytes,
    content_type: str,
    status: int,
    message: str,
) -> None:
    await create_staff_user(db)
    await sign_in(browser)

    refused = await upload_csv(browser, content, filename=filename, content_type=content_type)

    assert refused.status_code == status, refused.text
    assert message in refused.text
    assert '<p class="error" role="alert">' in refused.text
    assert await job_count(db) == 0


async def test_an_upload_without_a_file_part_or_with_two_files_is_refused(
    browser: httpx.AsyncClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    token = csrf_of(await browser.get(PAGE))

    no_file = await browser.post(PAGE, data={"csrf_token": token}, files={"other": ("x", b"")})
    two_files = await browser.post(
        PAGE,
        data={"csrf_token": token},
        files=[("file", ("a.csv", b"a", "text/csv")), ("file", ("b.csv", b"b", "text/csv"))],
    )

    assert no_file.status_code == 422, no_file.text
    assert "Choose a CSV file to upload" in no_file.text
    assert two_files.status_code == 400, two_files.text
    assert await job_count(db) == 0


async def test_the_multipart_upload_without_its_csrf_token_is_refused(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    body, _ = await three_awards(api)

    for token in (None, "", "forged"):
        refused = await upload_csv(browser, body, token=token)
        assert refused.status_code == 403, refused.text
        assert "out of date" in refused.text
    assert await job_count(db) == 0


async def test_an_upload_without_a_session_goes_to_sign_in_and_stores_nothing(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    body, _ = await three_awards(api)
    answered = await browser.post(PAGE, files={"file": ("a.csv", body, "text/csv")})
    assert answered.status_code == 303
    assert answered.headers["location"].startswith("/console/sign-in")
    assert await job_count(db) == 0


@pytest.mark.parametrize("role", ["manager", "support_agent"])
async def test_roles_without_the_bulk_scope_get_403_on_every_bulk_page(
    browser: httpx.AsyncClient, api: ApiClient, db: Database, role: str
) -> None:
    body, _ = await three_awards(api)
    job_id = (
        await api.http.post(
            BULK,
            content=body,
            headers={"Authorization": f"Bearer {api.key}", "Content-Type": "text/csv"},
        )
    ).json()["id"]
    await create_staff_user(db, role=role)
    await sign_in(browser)
    token = csrf_of(await browser.get("/console"))

    for path in (PAGE, f"{PAGE}/{job_id}", f"{PAGE}/{job_id}/rows.csv"):
        refused = await browser.get(path)
        assert refused.status_code == 403, path
        assert "points:bulk" in refused.text
    upload = await browser.post(
        PAGE, data={"csrf_token": token}, files={"file": ("a.csv", body, "text/csv")}
    )
    assert upload.status_code == 403
    assert await job_count(db) == 1
    assert 'href="/console/bulk-awards"' not in (await browser.get("/console")).text


async def test_an_org_bound_admin_sees_only_its_organisations_jobs(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    mine = (await api.create_organisation())["id"]
    theirs = (await api.create_organisation())["id"]
    own = await api.create_member(organisation_id=mine)
    await create_staff_user(db, organisation=mine)
    await sign_in(browser)
    other_key = await issue_key(db, Role.ADMIN, organisation=theirs)
    other_job = (
        await api.http.post(
            BULK,
            content=csv_body("email,points", "x@example.org,5").encode(),
            headers={"Authorization": f"Bearer {other_key}", "Content-Type": "text/csv"},
        )
    ).json()["id"]

    mine_answer = await upload_csv(browser, csv_body("member_id,points", f"{own['id']},5").encode())
    own_job = mine_answer.headers["location"].rsplit("/", 1)[1]

    listing = await browser.get(PAGE)
    assert own_job in listing.text
    assert other_job not in listing.text
    for path in (f"{PAGE}/{other_job}", f"{PAGE}/{other_job}/rows.csv"):
        hidden = await browser.get(path)
        assert hidden.status_code == 404, path
        assert "does not exist" in hidden.text
    api_job = await get_job(api, own_job)
    assert api_job["total_rows"] == 1


async def test_no_bulk_page_answers_500_to_a_fuzzed_query_string(
    browser: httpx.AsyncClient, api: ApiClient, db: Database
) -> None:
    await create_staff_user(db)
    await sign_in(browser)
    body, _ = await three_awards(api)
    answered = await upload_csv(browser, body)
    job_path = answered.headers["location"]
    chooser = random.Random(7)
    values = ["", "%", "\x00", "'", "queued", "x" * 600, "-1", "eyJhZnRlciI6LTF9", "é", "[]"]
    names = ["cursor", "status", "limit", "outcome", "x"]
    for _ in range(60):
        query = {chooser.choice(names): chooser.choice(values) for _ in range(2)}
        for path in (PAGE, job_path, f"{job_path}/rows.csv"):
            got = await browser.get(path, params=query)
            assert got.status_code < 500, (path, query, got.text[:300])
    for raw in ("cursor=%FF%FE", "status=%00", "%", "=&=&", "cursor=e30"):
        got = await browser.get(f"{PAGE}?{raw}")
        assert got.status_code < 500, (raw, got.text[:300])
