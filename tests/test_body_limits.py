"""Request bodies are checked as they stream in: the API key before any byte is read, then
a size limit (`MAX_BODY_BYTES`, and the bulk upload's own) enforced chunk by chunk."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memberhub.app import create_app
from memberhub.kit.db import Database
from memberhub.settings import Settings
from tests.support import ApiClient
from tests.support_server import running_server

MEMBERS = "/api/v1/members"
BULK_AWARDS = "/api/v1/points/bulk-awards"
MIB = 1024 * 1024


class CountingBody:
    """`total` bytes in 1 MiB chunks, counting how many the server pulled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = b" " * MIB
        while self.pulled < self.total:
            self.pulled += len(chunk)
            yield chunk


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def _rss_peak_since_reset() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset), in bytes, of this process (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


async def test_a_body_over_the_limit_is_refused_as_it_streams_and_nothing_changes(
    api: ApiClient, settings: Settings, db: Database
) -> None:
    app = create_app(settings.model_copy(update={"max_body_bytes": 64 * 1024}), db=db)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        headers = {"Authorization": f"Bearer {api.key}", "Content-Type": "application/json"}
        body = CountingBody(50 * MIB)  # no Content-Length: sent chunked
        response = await client.post(MEMBERS, content=body, headers=headers)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert (error["code"], error["details"]) == ("PAYLOAD_TOO_LARGE", {"max_bytes": 65536})
        assert body.pulled <= 2 * MIB
        declared = await client.post(MEMBERS, content=b"{" + b" " * 70_000 + b"}", headers=headers)
        assert declared.status_code == 413
        fits = await client.post(MEMBERS, json={"email": "a@example.com"}, headers=headers)
        assert fits.status_code == 201, fits.text
    assert [m["email"] for m in (await api.get(MEMBERS)).json()["data"]] == ["a@example.com"]


@pytest.mark.parametrize("key", [None, "mh_not_a_key"])
async def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(
    settings: Settings, db: Database, key: str | None
) -> None:
    app = create_app(settings, db=db)
    transport = httpx.ASGITransport(app=app)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        body = CountingBody(250 * MIB)
        response = await client.post(MEMBERS, content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert body.pulled <= MIB  # the transport's first chunk, never asked for by the app


async def test_a_250_mb_request_without_a_key_leaves_the_servers_memory_where_it_was(
    settings: Settings, db: Database
) -> None:
    body = CountingBody(250 * MIB)
    async with (
        running_server(settings) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=60) as client,
    ):
        assert (await client.get("/health")).status_code == 200  # warm
        _reset_rss_peak()
        before, _ = _rss_peak_since_reset()
        try:
            response: Any = await client.post(MEMBERS, content=body)
        except httpx.TransportError as exc:  # the server may close once it has answered
            response = exc
        _, peak = _rss_peak_since_reset()
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 401
    assert peak - before < 20 * MIB, f"grew by {(peak - before) / MIB:.0f} MiB"


async def test_a_bulk_upload_has_its_own_limit(
    api: ApiClient, settings: Settings, db: Database
) -> None:
    app = create_app(
        settings.model_copy(update={"max_body_bytes": 1024, "bulk_upload_max_bytes": 4096}),
        db=db,
    )
    member = await api.create_member()
    headers = {"Authorization": f"Bearer {api.key}", "Content-Type": "text/csv"}
    rows = "member_id,points\n" + f"{member['id']},1\n" * 60  # over 1 KiB, under 4 KiB
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        accepted = await client.post("/api/v1/points/bulk-awards", content=rows, headers=headers)
        assert accepted.status_code == 202, accepted.text
        refused = await client.post("/api/v1/points/bulk-awards", content=rows * 3, headers=headers)
        assert refused.status_code == 413
        assert refused.json()["error"]["details"] == {"max_bytes": 4096}


def _open_files_in(directory: Path) -> list[str]:
    """The files this process holds open in `directory` (an unnamed temporary file shows as
    `#<inode> (deleted)`)."""
    opened = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile, as the one listing the directory is
            continue
        if target.startswith(f"{directory.resolve()}/"):
            opened.append(target)
    return opened


async def test_a_bulk_upload_goes_to_a_temporary_file_that_no_outcome_leaves_behind(
    api: ApiClient, settings: Settings, db: Database
) -> None:
    limit = 4 * MIB
    app = create_app(settings.model_copy(update={"bulk_upload_max_bytes": limit}), db=db)
    data_dir = settings.data_dir
    files_before = sorted(data_dir.iterdir())
    member = await api.create_member()
    row = f"{member['id']},1\n".encode()
    seen_while_streaming: list[list[str]] = []
    pulled = 0

    async def rows(total: int) -> AsyncIterator[bytes]:
        """A CSV of about `total` bytes in 256 KiB pieces, noting the files held open in
        the data directory once 2 MiB are sent."""
        nonlocal pulled
        pulled = 0
        yield b"member_id,points\n"
        piece = row * (256 * 1024 // len(row))
        while pulled < total:
            if pulled >= 2 * MIB and not seen_while_streaming:
                seen_while_streaming.append(_open_files_in(data_dir))
            pulled += len(piece)
            yield piece

    headers = {"Authorization": f"Bearer {api.key}", "Content-Type": "text/csv"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        refused = await client.post(BULK_AWARDS, content=rows(50 * MIB), headers=headers)
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["details"]) == ("PAYLOAD_TOO_LARGE", {"max_bytes": limit})
        assert pulled <= limit + MIB
        # Past the in-memory part, the body was in an unnamed file in the data directory.
        assert [len(files) for files in seen_while_streaming] == [1]
        assert seen_while_streaming[0][0].endswith(" (deleted)")
        assert _open_files_in(data_dir) == []

        accepted = await client.post(
            BULK_AWARDS, content=rows(3 * MIB), params={"reason": "x"}, headers=headers
        )
        assert accepted.status_code == 202, accepted.text
        assert _open_files_in(data_dir) == []
        bad = await client.post(
            BULK_AWARDS,
            content=b"member_id,points\n" + row * 100_000 + b"x,1,2\n",
            params={"reason": "x"},
            headers=headers,
        )
        assert bad.status_code == 422, bad.text
        assert _open_files_in(data_dir) == []
    assert sorted(data_dir.iterdir()) == files_before
