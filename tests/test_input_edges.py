"""Input at the edges of what the API reads: lone surrogates in keys an error repeats, a
member import whose bad row must fail alone, the import mapping's JSON, labels with
control characters, dates given as date-times."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from memberhub.kit.db import Database
from tests.bulk.conftest import run_worker
from tests.support import ApiClient

IMPORTS = "/api/v1/imports/members"
BULK = "/api/v1/points/bulk-awards"


def _headers(api: ApiClient, content_type: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.key}", "Content-Type": content_type}


async def test_a_row_with_a_lone_surrogate_email_fails_only_that_row(
    api: ApiClient, db: Database
) -> None:
    body = b'{"email": "good@example.com"}\n{"email": "\\ud800@example.com"}\n'
    created = await api.http.post(
        IMPORTS, content=body, headers=_headers(api, "application/x-ndjson")
    )
    assert created.status_code == 202, created.text
    await run_worker(db)
    job = (await api.get(f"{IMPORTS}/{created.json()['id']}")).json()
    assert job["status"] == "completed", job
    assert (job["failed_rows"], job["changed_rows"]) == (1, 1), job
    members = await api.get("/api/v1/members", params={"email": "good@example.com"})
    assert len(members.json()["data"]) == 1


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        (BULK, "application/json", b'{"\\ud800": 1}'),
        (BULK, "application/json", b'{"rows": [{"\\ud800": 1}]}'),
        (IMPORTS, "application/x-ndjson", b'{"email": "a@example.com", "custom.\\ud800": "x"}\n'),
        (
            IMPORTS,
            "application/x-ndjson",
            b'{"email": "a@example.com", "\\ud800": 1, "\\ud800": 2}\n',
        ),
    ],
)
async def test_an_upload_key_with_a_lone_surrogate_is_refused_as_malformed(
    app: Any, api: ApiClient, path: str, content_type: str, body: bytes
) -> None:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.post(path, content=body, headers=_headers(api, content_type))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "MALFORMED_UPLOAD"


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ("[" * 5000, "mapping must be a JSON object"),
        ('{"E-mail": "first_name", "E-mail": "email"}', "names a column twice"),
    ],
)
async def test_an_import_mapping_nested_too_deep_or_naming_a_column_twice_is_refused(
    api: ApiClient, mapping: str, expected: str
) -> None:
    response = await api.http.post(
        IMPORTS,
        params={"mapping": mapping},
        content=b"E-mail\na@example.com\n",
        headers=_headers(api, "text/csv"),
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert expected in error["message"]
    assert error["details"]["field"] == "mapping"
    assert (await api.get(IMPORTS)).json()["data"] == []


@pytest.mark.parametrize("field", ["source", "agent_id"])
async def test_a_lead_label_with_a_nul_is_a_field_error(api: ApiClient, field: str) -> None:
    response = await api.post("/api/v1/leads", {"email": "l@example.com", field: "web\x00site"})
    assert response.status_code == 422, response.text
    fields = response.json()["error"]["details"]["fields"]
    assert fields[0]["loc"] == ["body", field]
    assert (await api.get("/api/v1/leads")).json()["data"] == []


@pytest.mark.parametrize("value", ["2000-01-01T00:00:00", "2000-01-01T00:00:00Z", "20000101"])
async def test_a_date_of_birth_is_a_date_only(api: ApiClient, value: str) -> None:
    refused = await api.post("/api/v1/members", {"email": "d@example.com", "date_of_birth": value})
    assert refused.status_code == 422, refused.text
    member = await api.create_member()
    patched = await api.patch(f"/api/v1/members/{member['id']}", {"date_of_birth": value})
    assert patched.status_code == 422, patched.text
    kept = await api.patch(f"/api/v1/members/{member['id']}", {"date_of_birth": "2000-01-01"})
    assert kept.json()["date_of_birth"] == "2000-01-01"
