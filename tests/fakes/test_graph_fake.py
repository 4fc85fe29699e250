"""The fake Microsoft Graph answers as Graph's drive API and the identity platform do."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.fakes.graph import PART_UNIT_BYTES, FakeGraph, running_fake_graph

TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SECRET = "client-secret-value-0123456789"


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[FakeGraph]:
    async with running_fake_graph() as fake:
        yield fake


@pytest.fixture
def fake(running: FakeGraph) -> FakeGraph:
    running.reset()
    running.add_app(TENANT, CLIENT_ID, SECRET)
    return running


async def token(http: httpx.AsyncClient, fake: FakeGraph, secret: str = SECRET) -> httpx.Response:
    return await http.post(
        f"{fake.login_url}/{TENANT}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": secret,
            "scope": "https://graph.microsoft.com/.default",
        },
    )


@pytest.fixture
async def http(fake: FakeGraph) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = (await token(client, fake)).json()
        client.headers["Authorization"] = f"Bearer {answer['access_token']}"
        yield client


async def test_the_token_endpoint_grants_client_credentials_and_refuses_a_wrong_secret(
    fake: FakeGraph,
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        granted = await token(client, fake)
        refused = await token(client, fake, secret="not-the-secret")

    assert granted.status_code == 200
    assert granted.json()["token_type"] == "Bearer"
    assert granted.json()["expires_in"] == 3599
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    assert refused.json()["error_description"].startswith("AADSTS7000215")


async def test_graph_calls_need_a_valid_token(fake: FakeGraph, http: httpx.AsyncClient) -> None:
    drive = fake.add_drive()
    ok = await http.get(f"{fake.graph_url}/drives/{drive}")
    fake.expire_tokens()
    expired = await http.get(f"{fake.graph_url}/drives/{drive}")

    assert ok.status_code == 200
    assert ok.json()["driveType"] == "documentLibrary"
    assert expired.status_code == 401
    assert expired.json()["error"]["code"] == "InvalidAuthenticationToken"


async def test_a_simple_upload_creates_folders_and_refuses_over_4_mb(
    fake: FakeGraph, http: httpx.AsyncClient
) -> None:
    drive = fake.add_drive()
    url = f"{fake.graph_url}/drives/{drive}/root:/a/b/c.txt:/content"

    created = await http.put(url, content=b"hello")
    replaced = await http.put(url, content=b"hello again")
    too_big = await http.put(url, content=b"x" * (4 * 1024 * 1024 + 1))
    children = await http.get(f"{fake.graph_url}/drives/{drive}/root:/a:/children")

    assert (created.status_code, replaced.status_code, too_big.status_code) == (201, 200, 413)
    assert fake.file(drive, "a/b/c.txt") == b"hello again"
    assert [item["name"] for item in children.json()["value"]] == ["b"]
    assert "folder" in children.json()["value"][0]


async def test_an_upload_session_checks_ranges_and_says_what_it_expects_next(
    fake: FakeGraph, http: httpx.AsyncClient
) -> None:
    drive = fake.add_drive()
    session = await http.post(
        f"{fake.graph_url}/drives/{drive}/root:/big.bin:/createUploadSession", json={}
    )
    upload_url = session.json()["uploadUrl"]
    data = bytes(range(256)) * (PART_UNIT_BYTES * 3 // 256) + b"tail"
    total = len(data)
    part = data[:PART_UNIT_BYTES]

    async with httpx.AsyncClient(timeout=10) as anonymous:
        with_auth = await http.put(
            upload_url, content=part, headers={"Content-Range": f"bytes 0-{len(part) - 1}/{total}"}
        )
        odd = await anonymous.put(
            upload_url, content=data[:1000], headers={"Content-Range": f"bytes 0-999/{total}"}
        )
        first = await anonymous.put(
            upload_url, content=part, headers={"Content-Range": f"bytes 0-{len(part) - 1}/{total}"}
        )
        again = await anonymous.put(
            upload_url, content=part, headers={"Content-Range": f"bytes 0-{len(part) - 1}/{total}"}
        )
        status = await anonymous.get(upload_url)
        rest = data[PART_UNIT_BYTES:]
        last = await anonymous.put(
            upload_url,
            content=rest,
            headers={"Content-Range": f"bytes {PART_UNIT_BYTES}-{total - 1}/{total}"},
        )
        gone = await anonymous.get(upload_url)

    assert with_auth.status_code == 401
    assert odd.status_code == 400
    assert first.status_code == 202
    assert first.json()["nextExpectedRanges"] == [f"{PART_UNIT_BYTES}-"]
    assert again.status_code == 416
    assert again.json()["error"]["code"] == "invalidRange"
    assert status.json()["nextExpectedRanges"] == [f"{PART_UNIT_BYTES}-"]
    assert last.status_code == 201
    assert last.json()["size"] == total
    assert fake.file(drive, "big.bin") == data
    assert gone.status_code == 404


async def test_throttling_answers_429_with_retry_after_in_graphs_error_shape(
    fake: FakeGraph, http: httpx.AsyncClient
) -> None:
    drive = fake.add_drive()
    fake.throttle_next(1, retry_after=7)
    fake.throttle_next(1, retry_after=2, status=503)

    first = await http.get(f"{fake.graph_url}/drives/{drive}")
    second = await http.get(f"{fake.graph_url}/drives/{drive}")
    third = await http.get(f"{fake.graph_url}/drives/{drive}")

    assert (first.status_code, first.headers["Retry-After"]) == (429, "7")
    assert first.json()["error"]["code"] == "TooManyRequests"
    assert (second.status_code, second.headers["Retry-After"]) == (503, "2")
    assert third.status_code == 200


async def test_children_are_paged_with_an_absolute_next_link(
    fake: FakeGraph, http: httpx.AsyncClient
) -> None:
    drive = fake.add_drive()
    for n in range(5):
        fake.put_file(drive, f"f/{n}.txt", b"x")

    names: list[str] = []
    url: str | None = f"{fake.graph_url}/drives/{drive}/root:/f:/children?$top=2"
    pages = 0
    while url:
        page = (await http.get(url)).json()
        names += [item["name"] for item in page["value"]]
        url = page.get("@odata.nextLink")
        pages += 1

    assert pages == 3
    assert sorted(names) == [f"{n}.txt" for n in range(5)]


async def test_a_download_url_serves_byte_ranges(fake: FakeGraph, http: httpx.AsyncClient) -> None:
    drive = fake.add_drive()
    fake.put_file(drive, "d.bin", b"0123456789")
    item = (await http.get(f"{fake.graph_url}/drives/{drive}/root:/d.bin")).json()

    async with httpx.AsyncClient(timeout=10) as anonymous:
        part = await anonymous.get(
            item["@microsoft.graph.downloadUrl"], headers={"Range": "bytes=2-5"}
        )

    assert part.status_code == 206
    assert part.content == b"2345"
    assert part.headers["Content-Range"] == "bytes 2-5/10"
