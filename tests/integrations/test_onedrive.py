"""The OneDrive/SharePoint storage provider against the fake Microsoft Graph: files of any
size round-trip byte for byte, interrupted uploads resume, throttling is waited out, and
no secret reaches a log."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from memberhub.integrations.hub import IntegrationHub
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_storage, get_provider
from memberhub.integrations.providers.base import Connection, ObjectStorage
from memberhub.integrations.providers.onedrive import GraphError
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from tests.fakes.graph import PART_UNIT_BYTES, FakeGraph, running_fake_graph
from tests.support import ApiClient

TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "0f6e1d2c-3b4a-5968-7788-99aabbccddee"
SECRET = "Qx8~graph-client-secret-value-42"
PART = 8 * PART_UNIT_BYTES  # 2.5 MiB parts, so a 9 MB file takes four


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[FakeGraph]:
    async with running_fake_graph() as fake:
        yield fake


@pytest.fixture
def graph(running: FakeGraph) -> FakeGraph:
    running.reset()
    running.add_app(TENANT, CLIENT_ID, SECRET)
    return running


class Waits:
    """Stands in for the gateway's sleep: records each wait instead of taking it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
async def hub(settings: Settings, db: Database, waits: Waits) -> AsyncIterator[IntegrationHub]:
    integrations = IntegrationHub(
        db,
        SecretBox(settings.resolved_secret_key),
        UrlPolicy.from_settings(settings),
        retry_sleep=waits,
    )
    yield integrations
    await integrations.aclose()


def settings_for(graph: FakeGraph, drive_id: str, **config: Any) -> dict[str, Any]:
    return {
        "provider": "onedrive",
        "name": "Exports library",
        "config": {
            "base_url": graph.graph_url,
            "login_url": graph.login_url,
            "drive_id": drive_id,
            "folder": "memberhub/exports",
            "part_size_bytes": PART,
            **config,
        },
        "credentials": {"tenant_id": TENANT, "client_id": CLIENT_ID, "client_secret": SECRET},
    }


async def create(api: ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post("/api/v1/integrations", body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def connect(db: Database, hub: IntegrationHub, public_id: str) -> Connection:
    async with db.transaction(read_only=True) as session:
        integration = await session.scalar(
            select(Integration).where(Integration.public_id == public_id)
        )
    assert integration is not None
    return hub.connection(integration)


def storage() -> ObjectStorage:
    provider = get_provider("onedrive")
    assert provider is not None
    found = as_storage(provider)
    assert found is not None
    return found


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def test_small_and_large_files_round_trip_byte_for_byte(
    api: ApiClient, db: Database, hub: IntegrationHub, graph: FakeGraph, tmp_path: Path
) -> None:
    drive = graph.add_drive()
    integration = await create(api, settings_for(graph, drive))
    connection = await connect(db, hub, integration["id"])
    small = random_file(tmp_path / "small.csv", 1000)
    large = random_file(tmp_path / "large.parquet", 9 * 1024 * 1024)
    empty = random_file(tmp_path / "empty.jsonl", 0)

    stored_small = await storage().upload_file(
        connection,
        "members/dt=2026-01-01/part-0.csv",
        tmp_path / "small.csv",
        content_type="text/csv",
    )
    stored_large = await storage().upload_file(
        connection,
        "members/dt=2026-01-01/part-1.parquet",
        tmp_path / "large.parquet",
        content_type="application/vnd.apache.parquet",
    )
    await storage().upload_file(
        connection, "empty.jsonl", tmp_path / "empty.jsonl", content_type="application/jsonl"
    )
    for key, name in (
        ("members/dt=2026-01-01/part-0.csv", "small.out"),
        ("members/dt=2026-01-01/part-1.parquet", "large.out"),
        ("empty.jsonl", "empty.out"),
    ):
        await storage().download_file(connection, key, tmp_path / name)

    assert (stored_small.size, stored_large.size) == (1000, 9 * 1024 * 1024)
    assert stored_large.etag
    assert graph.file(drive, "memberhub/exports/members/dt=2026-01-01/part-1.parquet") == large
    assert (tmp_path / "small.out").read_bytes() == small
    assert (tmp_path / "large.out").read_bytes() == large
    assert (tmp_path / "empty.out").read_bytes() == empty
    parts = [r for r in graph.requests() if r.method == "PUT" and r.path.startswith("/upload/")]
    assert [p.size for p in parts] == [PART, PART, PART, 9 * 1024 * 1024 - 3 * PART]
    # The upload URL is pre-authenticated: no token is sent to it.
    assert all("authorization" not in p.headers for p in parts)
    simple = [r for r in graph.requests() if r.method == "PUT" and r.path.endswith(":/content")]
    assert len(simple) == 2  # the small and the empty file
    assert graph.tokens_issued == 1  # one token, kept for every call


async def test_listing_by_prefix_follows_pages_and_folders_in_key_order(
    api: ApiClient, db: Database, hub: IntegrationHub, graph: FakeGraph
) -> None:
    drive = graph.add_drive()
    integration = await create(api, settings_for(graph, drive))
    connection = await connect(db, hub, integration["id"])
    for n in range(450):
        graph.put_file(drive, f"memberhub/exports/events/dt=2026-01-02/part-{n:04d}.csv", b"x" * n)
    graph.put_file(drive, "memberhub/exports/events/dt=2026-01-03/part-0000.csv", b"y")
    graph.put_file(drive, "memberhub/exports/members/part-0.csv", b"z")
    graph.put_file(drive, "elsewhere/events/part-0.csv", b"outside the folder")

    day = await storage().list_objects(connection, "events/dt=2026-01-02/")
    events = await storage().list_objects(connection, "events/")
    by_name_start = await storage().list_objects(connection, "events/dt=2026-01-0")
    everything = await storage().list_objects(connection, "")
    missing = await storage().list_objects(connection, "nothing/here/")

    assert [o.key for o in day] == [f"events/dt=2026-01-02/part-{n:04d}.csv" for n in range(450)]
    assert day[7].size == 7
    assert len(events) == 451 == len(by_name_start)
    assert [o.key for o in events] == sorted(o.key for o in events)
    assert len(everything) == 452
    assert missing == []
    pages = [r for r in graph.requests() if r.path.endswith("dt=2026-01-02:/children")]
    assert pages  # and the pages after the first came from @odata.nextLink
    assert any("skiptoken" in r.query for r in graph.requests())


async def test_delete_removes_the_object_and_tolerates_one_already_gone(
    api: ApiClient, db: Database, hub: IntegrationHub, graph: FakeGraph, tmp_path: Path
) -> None:
    drive = graph.add_drive()
    integration = await create(api, settings_for(graph, drive, folder=""))
    connection = await connect(db, hub, integration["id"])
    graph.put_file(drive, "old/backup.db", b"data")

    await storage().delete_object(connection, "old/backup.db")
    await storage().delete_object(connection, "old/backup.db")

    assert graph.file(drive, "old/backup.db") is None
    with pytest.raises(FileNotFoundError):
        await storage().download_file(connection, "old/backup.db", tmp_path / "x")
    assert not (tmp_path / "x").exists()


async def test_an_interrupted_upload_session_resumes_where_graph_stopped(
    api: ApiClient, db: Database, hub: IntegrationHub, graph: FakeGraph, tmp_path: Path
) -> None:
    drive = graph.add_drive()
    integration = await create(api, settings_for(graph, drive))
    connection = await connect(db, hub, integration["id"])
    data = random_file(tmp_path / "big.bin", 6 * 1024 * 1024 + 123)
    # The first two parts arrive but their answers are lost on the way back.
    graph.interrupt_parts(2)

    stored = await storage().upload_file(
        connection, "big.bin", tmp_path / "big.bin", content_type="application/octet-stream"
    )

    assert stored.size == len(data)
    assert graph.file(drive, "memberhub/exports/big.bin") == data
    status_reads = [
        r for r in graph.requests() if r.method == "GET" and r.path.startswith("/upload/")
    ]
    assert status_reads  # the session was asked what it still expects
    sessions = [r for r in graph.requests() if r.path.endswith(":/createUploadSession")]
    assert len(sessions) == 1  # resumed, not started over
    assert graph.open_sessions() == 0


async def test_a_failed_upload_cancels_its_session_and_leaves_no_file(
    api: ApiClient, db: Database, hub: IntegrationHub, graph: FakeGraph, tmp_path: Path
) -> None:
    drive = graph.add_drive()
    integration = await create(api, settings_for(graph, drive))
    connection = await connect(db, hub, integration["id"])
    random_file(tmp_path / "big.bin", 5 * 1024 * 1024)

    # The second part is refused for good.
    graph.fail_parts(1, status=400)
    graph.interrupt_parts(0)

    with pytest.raises(GraphError, match="400 invalidRequest"):
        await storage().upload_file(
            connection, "big.bin", tmp_path / "big.bin", content_type="application/octet-stream"
        )

    assert graph.file(drive, "memberhub/exports/big.bin") is None
    assert graph.open_sessions() == 0  # cancelled, not left to expire
    cancels = [r for r in graph.requests() if r.method == "DELETE" and "/upload/" in r.path]
    assert len(cancels) == 1


async def test_429_and_503_answers_are_waited_out_for_as_long_as_retry_after_says(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    graph: FakeGraph,
    waits: Waits,
    tmp_path: Path,
) -> None:
    drive = graph.add_drive()
    integration = await create(api, settings_for(graph, drive))
    connection = await connect(db, hub, integration["id"])
    data = random_file(tmp_path / "big.bin", 5 * 1024 * 1024)
    graph.throttle_next(2, retry_after=17)
    graph.throttle_next(1, retry_after=4, status=503)

    await storage().upload_file(
        connection, "big.bin", tmp_path / "big.bin", content_type="application/octet-stream"
    )
    await storage().download_file(connection, "big.bin", tmp_path / "back.bin")

    assert waits.seconds[:3] == [17.0, 17.0, 4.0]
    assert (tmp_path / "back.bin").read_bytes() == data


async def test_an_expired_token_is_renewed_once_and_the_call_goes_through(
    api: ApiClient, db: Database, hub: IntegrationHub, graph: FakeGraph, tmp_path: Path
) -> None:
    drive = graph.add_drive()
    integration = await create(api, settings_for(graph, drive))
    connection = await connect(db, hub, integration["id"])
    random_file(tmp_path / "a.txt", 10)
    await storage().upload_file(connection, "a.txt", tmp_path / "a.txt", content_type="text/plain")

    graph.expire_tokens()
    listed = await storage().list_objects(connection, "")

    assert [o.key for o in listed] == ["a.txt"]
    assert graph.tokens_issued == 2


async def test_the_connection_check_reads_the_drive_and_reports_bad_credentials(
    api: ApiClient, graph: FakeGraph
) -> None:
    drive = graph.add_drive("Exports")
    integration = await create(api, settings_for(graph, drive))
    ok = await api.post(f"/api/v1/integrations/{integration['id']}/test")

    wrong = "Zz9~another-secret-that-is-wrong"
    patched = await api.patch(
        f"/api/v1/integrations/{integration['id']}", {"credentials": {"client_secret": wrong}}
    )
    refused = await api.post(f"/api/v1/integrations/{integration['id']}/test")
    unknown = await create(api, settings_for(graph, "b!no-such-drive"))
    no_drive = await api.post(f"/api/v1/integrations/{unknown['id']}/test")

    assert ok.json()["ok"] is True, ok.text
    assert "Exports" in ok.json()["message"]
    assert patched.status_code == 200
    assert refused.json()["ok"] is False
    assert "invalid_client" in refused.json()["message"]
    assert "AADSTS7000215" in refused.json()["message"]
    assert wrong not in refused.text
    assert no_drive.json()["ok"] is False
    assert "itemNotFound" in no_drive.json()["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"config": {"drive_id": None}}, "config.drive_id"),
        ({"config": {"part_size_bytes": 1_000_000}}, "config.part_size_bytes"),
        ({"config": {"part_size_bytes": 64 * 1024 * 1024}}, "config.part_size_bytes"),
        ({"config": {"folder": "exports/../secrets"}}, "config.folder"),
        ({"config": {"folder": "a:b"}}, "config.folder"),
        ({"config": {"login_url": "ftp://login"}}, "config.login_url"),
        ({"credentials": {"client_id": "not-a-guid"}}, "credentials.client_id"),
        ({"credentials": {"tenant_id": "contoso/../x"}}, "credentials.tenant_id"),
        ({"credentials": {"client_secret": None}}, "credentials.client_secret"),
        ({"credentials": {"surprise": "x"}}, "credentials.surprise"),
    ],
)
async def test_bad_settings_are_refused_with_a_422_naming_the_field(
    api: ApiClient, graph: FakeGraph, change: dict[str, Any], field: str
) -> None:
    body = settings_for(graph, "b!drive")
    for part, values in change.items():
        for name, value in values.items():
            if value is None:
                body[part].pop(name)
            else:
                body[part][name] = value

    response = await api.post("/api/v1/integrations", body)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert field in [f["field"] for f in error["details"]["fields"]]
    assert SECRET not in response.text
    assert (await api.get("/api/v1/integrations")).json()["data"] == []


async def test_no_secret_reaches_the_logs_or_the_payload_log(
    api: ApiClient,
    db: Database,
    hub: IntegrationHub,
    graph: FakeGraph,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    drive = graph.add_drive()
    integration = await create(api, settings_for(graph, drive))
    connection = await connect(db, hub, integration["id"])
    random_file(tmp_path / "big.bin", 5 * 1024 * 1024)
    graph.interrupt_parts(1)
    await storage().upload_file(
        connection, "big.bin", tmp_path / "big.bin", content_type="application/octet-stream"
    )
    await storage().download_file(connection, "big.bin", tmp_path / "back.bin")
    await storage().list_objects(connection, "")
    await hub.drain()

    calls = await api.get(f"/api/v1/integrations/{integration['id']}/calls?limit=500")
    shown = await api.get(f"/api/v1/integrations/{integration['id']}")
    captured = capsys.readouterr()

    assert calls.status_code == 200
    logged = calls.text
    assert "oauth2/v2.0/token" in logged
    assert "/upload/" in logged
    assert SECRET not in logged
    assert SECRET not in shown.text
    assert SECRET not in caplog.text + captured.out + captured.err
    issued = [r for r in graph.requests() if r.path.startswith("/v1.0/")]
    token = issued[0].headers["authorization"].removeprefix("Bearer ")
    assert token not in logged
    # The pre-authenticated upload and download URLs' tempauth is masked too.
    tempauths = [r.query for r in graph.requests() if "tempauth=" in r.query]
    assert tempauths
    for query in tempauths:
        value = query.split("tempauth=")[1].split("&")[0]
        assert value not in logged
    # File bytes are not copied into the log: their size is.
    assert f"<{PART} bytes>" in logged


async def test_a_last_part_whose_answer_was_lost_still_completes_the_upload(
    api: ApiClient, db: Database, hub: IntegrationHub, graph: FakeGraph, tmp_path: Path
) -> None:
    drive = graph.add_drive()
    integration = await create(api, settings_for(graph, drive))
    connection = await connect(db, hub, integration["id"])
    data = random_file(tmp_path / "one-part.bin", 2 * PART - 1)
    graph.interrupt_parts(2)  # both parts arrive; both answers, the last one's too, are lost

    stored = await storage().upload_file(
        connection, "one-part.bin", tmp_path / "one-part.bin", content_type="text/plain"
    )

    assert stored.size == len(data)
    assert graph.file(drive, "memberhub/exports/one-part.bin") == data
