"""The `memberhub` command: API keys, the demo data set and migrations.

The CLI runs its own event loop (asyncio.run), so each invocation runs in a worker thread
while the test's loop waits; the test checks the effects through the HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sqlite3
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from typer.testing import CliRunner, Result

from memberhub.cli import app as cli_app
from memberhub.cli import main
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.kit.migrate import alembic_config, head
from memberhub.memberships.jobs import advance_membership_statuses
from memberhub.settings import Settings
from tests.conftest import TEST_SECRET_KEY
from tests.support import ApiClient

MAIN = "from memberhub.cli import main; main()"
KEY_LINE = re.compile(r"^mh_[0-9A-Za-z]{44}$")
KEY_ANYWHERE = re.compile(r"mh_[0-9A-Za-z]{20,}")


@pytest.fixture
def cli_env(database_url: str, db: Database, tmp_path: Path) -> dict[str, str | None]:
    """Environment for the CLI, pointing at the test database (emptied by `db`)."""
    return {
        "MEMBERHUB_DATABASE_URL": database_url,
        "MEMBERHUB_DATA_DIR": str(tmp_path / "cli-data"),
        "MEMBERHUB_LOG_LEVEL": "WARNING",
    }


async def run_cli(env: dict[str, str | None], *args: str) -> Result:
    def invoke() -> Result:
        return CliRunner().invoke(cli_app, list(args), env=env)

    return await asyncio.to_thread(invoke)


def last_line(result: Result) -> str:
    lines = result.stdout.strip().splitlines()
    assert lines, result.output
    return lines[-1]


async def create_key(env: dict[str, str | None], *args: str) -> tuple[str, str]:
    """Create a key with the CLI; returns (key_id, secret)."""
    result = await run_cli(env, "apikey", "create", *args)
    assert result.exit_code == 0, result.output
    secret = last_line(result)
    assert KEY_LINE.match(secret), result.stdout
    key_id = re.search(r"\bkey_[0-9a-z]+\b", result.stdout)
    assert key_id is not None, result.stdout
    return key_id.group(0), secret


# ---------------------------------------------------------------- apikey create / list / revoke


async def test_apikey_create_prints_the_key_alone_on_the_last_line_and_it_works(
    cli_env: dict[str, str | None], http: httpx.AsyncClient
) -> None:
    key_id, secret = await create_key(cli_env, "--name", "x", "--role", "manager")
    assert key_id.startswith("key_")
    client = ApiClient(http, secret)

    listed = await client.get("/api/v1/members")
    assert listed.status_code == 200, listed.text
    created = await client.post("/api/v1/members", {"email": "ana@example.com"})
    assert created.status_code == 201
    # The key has the manager role, not more: plans are an admin's business.
    plan = {"code": "P", "name": "P", "term_months": 1, "price_amount": 1, "currency": "MYR"}
    assert (await client.post("/api/v1/plans", plan)).status_code == 403


async def test_apikey_create_honours_organisation_and_scopes(
    cli_env: dict[str, str | None], api: ApiClient, http: httpx.AsyncClient
) -> None:
    org = await api.create_organisation()
    other = await api.create_organisation()
    _, bound = await create_key(
        cli_env, "--name", "chapter", "--role", "manager", "--organisation", org["id"]
    )
    orgs = (await api.with_key(bound).get("/api/v1/organisations")).json()["data"]
    assert [o["id"] for o in orgs] == [org["id"]]
    assert (
        await api.with_key(bound).get(f"/api/v1/organisations/{other['id']}")
    ).status_code == 404

    _, read_only = await create_key(
        cli_env, "--name", "reader", "--role", "manager", "--scope", "members:read"
    )
    reader = ApiClient(http, read_only)
    assert (await reader.get("/api/v1/members")).status_code == 200
    assert (await reader.post("/api/v1/members", {"email": "a@example.com"})).status_code == 403


@pytest.mark.parametrize(
    "args",
    [
        ("--role", "manager", "--organisation", "org_doesnotexist"),
        ("--role", "support_agent", "--scope", "plans:write"),
        ("--role", "manager", "--scope", "no:such"),
    ],
    ids=["unknown-organisation", "scope-outside-role", "unknown-scope"],
)
async def test_apikey_create_fails_cleanly_on_bad_input(
    cli_env: dict[str, str | None], args: tuple[str, ...]
) -> None:
    result = await run_cli(cli_env, "apikey", "create", "--name", "bad", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert args[-1] in result.stderr, "the error names what it refused"
    assert "Traceback" not in result.output
    assert not KEY_ANYWHERE.search(result.output)
    listing = await run_cli(cli_env, "apikey", "list")
    assert "bad" not in listing.stdout


@pytest.mark.parametrize("name", ["   ", "n" * 300, "a\x00b"])
@pytest.mark.parametrize("command", ["apikey", "staff"])
async def test_a_name_the_api_would_refuse_is_refused_in_one_line(
    cli_env: dict[str, str | None], command: str, name: str
) -> None:
    extra = ["--role", "admin"] + (["--email", "n@example.org"] if command == "staff" else [])
    result = await run_cli(cli_env, command, "create", "--name", name, *extra)
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: name:"), line
    listing = await run_cli(cli_env, command, "list")
    assert "n@example.org" not in listing.stdout
    assert "nnnn" not in listing.stdout


async def test_apikey_create_refuses_an_overlong_rate_limit_in_one_line(
    cli_env: dict[str, str | None],
) -> None:
    result = await run_cli(
        cli_env, "apikey", "create", "--name", "x", "--role", "admin", "--rate-limit", "9" * 60
    )
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: rate_limit"), line


async def test_apikey_create_rejects_an_unknown_role(cli_env: dict[str, str | None]) -> None:
    result = await run_cli(cli_env, "apikey", "create", "--name", "x", "--role", "owner")
    assert result.exit_code == 2
    assert not KEY_ANYWHERE.search(result.output)


async def test_apikey_list_shows_keys_but_never_their_secrets(
    cli_env: dict[str, str | None],
) -> None:
    first_id, first = await create_key(cli_env, "--name", "billing-sync", "--role", "integration")
    second_id, second = await create_key(cli_env, "--name", "front-desk", "--role", "support_agent")
    await run_cli(cli_env, "apikey", "revoke", second_id)

    result = await run_cli(cli_env, "apikey", "list")
    assert result.exit_code == 0, result.output
    rows = result.stdout.strip().splitlines()
    assert len(rows) == 2
    assert first_id in rows[0]
    assert "billing-sync" in rows[0]
    assert "integration" in rows[0]
    assert "active" in rows[0]
    assert second_id in rows[1]
    assert "revoked" in rows[1]
    for secret in (first, second):
        assert secret not in result.output
        # Only the public lookup prefix (mh_ + 12 characters) may appear.
        assert secret[:16] not in result.output
    assert not KEY_ANYWHERE.search(result.output)


async def test_apikey_revoke_makes_the_key_fail_with_401(
    cli_env: dict[str, str | None], http: httpx.AsyncClient
) -> None:
    key_id, secret = await create_key(cli_env, "--name", "temp", "--role", "manager")
    client = ApiClient(http, secret)
    assert (await client.get("/api/v1/members")).status_code == 200

    result = await run_cli(cli_env, "apikey", "revoke", key_id)
    assert result.exit_code == 0, result.output
    assert f"revoked {key_id}" in result.stdout

    response = await client.get("/api/v1/members")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "API_KEY_REVOKED"


async def test_a_key_revoked_by_the_command_in_another_process_fails_at_once(
    cli_env: dict[str, str | None], http: httpx.AsyncClient, settings: Settings
) -> None:
    cli_env = {**cli_env, "MEMBERHUB_DATA_DIR": str(settings.data_dir)}  # the app's, as serve's
    key_id, secret = await create_key(cli_env, "--name", "temp", "--role", "manager")
    client = ApiClient(http, secret)
    assert (await client.get("/api/v1/members")).status_code == 200  # cached by the app

    environment = {**os.environ, **{k: v for k, v in cli_env.items() if v is not None}}
    revoked = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            "from memberhub.cli import main; main()",
            "apikey",
            "revoke",
            key_id,
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoked.returncode == 0, revoked.stderr

    response = await client.get("/api/v1/members")  # well within the cache's 5 s
    assert response.status_code == 401, response.text


async def test_apikey_revoke_of_an_unknown_or_revoked_key_fails_cleanly(
    cli_env: dict[str, str | None],
) -> None:
    unknown = await run_cli(cli_env, "apikey", "revoke", "key_doesnotexist")
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("error: ")

    key_id, _ = await create_key(cli_env, "--name", "temp", "--role", "manager")
    assert (await run_cli(cli_env, "apikey", "revoke", key_id)).exit_code == 0
    again = await run_cli(cli_env, "apikey", "revoke", key_id)
    assert again.exit_code == 1
    assert "already revoked" in again.stderr
    assert "Traceback" not in again.output


# ---------------------------------------------------------------- ensure-admin


async def test_apikey_ensure_admin_prints_a_key_the_first_time_only(
    cli_env: dict[str, str | None], http: httpx.AsyncClient
) -> None:
    first = await run_cli(cli_env, "apikey", "ensure-admin")
    assert first.exit_code == 0, first.output
    secret = last_line(first)
    assert KEY_LINE.match(secret)
    audit = await ApiClient(http, secret).get("/api/v1/audit")
    assert audit.status_code == 200, audit.text  # an admin-only endpoint

    second = await run_cli(cli_env, "apikey", "ensure-admin")
    assert second.exit_code == 0, second.output
    assert "already exists" in second.stdout
    assert not KEY_ANYWHERE.search(second.output)
    listing = await run_cli(cli_env, "apikey", "list")
    assert len(listing.stdout.strip().splitlines()) == 1


async def test_apikey_ensure_admin_replaces_a_revoked_admin_key(
    cli_env: dict[str, str | None],
) -> None:
    first = await run_cli(cli_env, "apikey", "ensure-admin")
    key_id = re.search(r"\bkey_[0-9a-z]+\b", (await run_cli(cli_env, "apikey", "list")).stdout)
    assert key_id is not None
    await run_cli(cli_env, "apikey", "revoke", key_id.group(0))

    again = await run_cli(cli_env, "apikey", "ensure-admin")
    assert KEY_LINE.match(last_line(again))
    assert last_line(again) != last_line(first)


async def test_an_organisation_bound_admin_does_not_count_as_the_admin_key(
    cli_env: dict[str, str | None], api: ApiClient, db: Database
) -> None:
    org = await api.create_organisation()
    async with db.transaction() as session:  # drop the fixture's installation-wide admin key
        await session.execute(text("UPDATE api_keys SET revoked_at = CURRENT_TIMESTAMP"))
    await create_key(cli_env, "--name", "org-admin", "--role", "admin", "--organisation", org["id"])
    result = await run_cli(cli_env, "apikey", "ensure-admin")
    assert KEY_LINE.match(last_line(result))


# ---------------------------------------------------------------- demo


async def _count(client: ApiClient, path: str, **params: str) -> int:
    response = await client.get(path, params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    assert response.json()["pagination"]["has_more"] is False
    return len(response.json()["data"])


async def test_demo_loads_an_hq_two_chapters_three_plans_and_members_in_every_status(
    cli_env: dict[str, str | None], api: ApiClient, db: Database
) -> None:
    result = await run_cli(cli_env, "demo")
    assert result.exit_code == 0, result.output
    assert "200 members" in result.stdout

    orgs = (await api.get("/api/v1/organisations")).json()["data"]
    hqs = [o for o in orgs if o["kind"] == "hq"]
    assert len(hqs) == 1
    assert hqs[0]["slug"] == "demo-hq"
    chapters = [o for o in orgs if o["kind"] == "chapter"]
    assert len(chapters) == 2
    assert {c["parent_id"] for c in chapters} == {hqs[0]["id"]}
    assert hqs[0]["id"] in result.stdout

    plans = (await api.get("/api/v1/plans")).json()["data"]
    assert sorted(p["code"] for p in plans) == ["DEMO-CORPORATE", "DEMO-STANDARD", "DEMO-STUDENT"]

    assert await _count(api, "/api/v1/members") == 200
    by_status = {
        status: await _count(api, "/api/v1/members", status=status)
        for status in ("pending", "active", "grace", "lapsed", "suspended", "cancelled")
    }
    assert sum(by_status.values()) == 200
    assert all(count > 0 for count in by_status.values()), by_status
    for org in orgs:
        assert await _count(api, "/api/v1/members", organisation_id=org["id"]) > 0

    # The statuses agree with the dates: a scheduler run now has nothing to move.
    async with db.transaction() as session:
        assert await advance_membership_statuses(session, utcnow()) == 0
    grace = (await api.get("/api/v1/members", params={"status": "grace"})).json()["data"][0]
    history = await api.get(f"/api/v1/members/{grace['id']}/status-history")
    assert [(c["from_status"], c["to_status"]) for c in history.json()["data"]] == [
        ("pending", "active"),
        ("active", "grace"),
    ]


async def test_demo_run_twice_fails_cleanly_and_adds_nothing(
    cli_env: dict[str, str | None], api: ApiClient
) -> None:
    assert (await run_cli(cli_env, "demo", "--members", "20")).exit_code == 0
    again = await run_cli(cli_env, "demo", "--members", "20")
    assert again.exit_code != 0
    assert "already loaded" in again.stderr
    assert "Traceback" not in again.output
    assert await _count(api, "/api/v1/members") == 20
    assert await _count(api, "/api/v1/organisations") == 3


# ---------------------------------------------------------------- db upgrade


async def test_production_never_generates_a_secret_key(tmp_path: Path) -> None:
    env: dict[str, str | None] = {
        "MEMBERHUB_ENV": "production",
        "MEMBERHUB_DATA_DIR": str(tmp_path / "data"),
        "MEMBERHUB_SECRET_KEY": None,
        "MEMBERHUB_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
    }
    for command in (["serve", "--port", "1"], ["worker"]):
        result = await run_cli(env, *command)
        assert result.exit_code == 1, result.output
        assert "ENV=production: set MEMBERHUB_SECRET_KEY" in result.stderr
    assert not (tmp_path / "data" / "secret_key").exists()


async def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    result = await run_cli({"MEMBERHUB_DATA_DIR": str(tmp_path)}, "--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"memberhub {version('memberhub')}"


async def test_db_upgrade_migrates_a_fresh_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    env: dict[str, str | None] = {
        "MEMBERHUB_DATABASE_URL": f"sqlite+aiosqlite:///{path}",
        "MEMBERHUB_DATA_DIR": str(tmp_path / "data"),
    }
    before = await run_cli(env, "db", "current")
    assert before.exit_code == 0, before.output
    assert "database: no revision (never migrated)" in before.stdout
    result = await run_cli(env, "db", "upgrade")
    assert result.exit_code == 0, result.output
    applied = [line for line in result.stdout.splitlines() if line.startswith("applied ")]
    assert applied[0].startswith("applied 0001: ")
    newest = head()
    assert applied[-1].startswith(f"applied {newest}: ")
    assert result.stdout.splitlines()[-1] == f"database is at {newest}"
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"members", "organisations", "api_keys", "alembic_version"} <= tables

    again = await run_cli(env, "db", "upgrade")  # idempotent
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == ["nothing to apply", f"database is at {newest}"]
    after = await run_cli(env, "db", "current")
    assert after.stdout.splitlines() == [f"database: {newest}", f"newest:   {newest}"]
    admin = await run_cli(env, "apikey", "ensure-admin")
    assert admin.exit_code == 0, admin.output
    assert KEY_LINE.match(last_line(admin))


def _fresh_sqlite_env(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    path = tmp_path / "service.db"
    return path, {
        "MEMBERHUB_DATABASE_URL": f"sqlite+aiosqlite:///{path}",
        "MEMBERHUB_DATA_DIR": str(tmp_path / "data"),
        "MEMBERHUB_LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What `serve` would have served: uvicorn.run records its app instead of running it
    (and the address, port 1 in SERVE, is not tried)."""
    apps: list[object] = []
    monkeypatch.setattr("uvicorn.run", lambda application, **options: apps.append(application))
    monkeypatch.setattr("memberhub.cli._require_listenable", lambda host, port: None)
    return apps


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVE = ("serve", "--processes", "1", "--port", "1")


async def test_serve_and_worker_refuse_a_database_never_migrated(
    tmp_path: Path, served: list[object]
) -> None:
    _, env = _fresh_sqlite_env(tmp_path)
    for command, hint in ((SERVE, " (or start with --upgrade)"), (("worker",), "")):
        result = await run_cli(env, *command)
        assert result.exit_code == 1, result.output
        assert result.stderr.strip() == (
            f"error: the database has no schema yet: run `memberhub db upgrade` first{hint}"
        )
    assert served == []
    current = await run_cli(env, "db", "current")
    assert "database: no revision (never migrated)" in current.stdout


async def test_serve_refuses_a_database_behind_this_version(
    tmp_path: Path, served: list[object]
) -> None:
    _, env = _fresh_sqlite_env(tmp_path)
    newest = head()
    previous = ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision(newest)
    assert previous is not None
    assert isinstance(previous.down_revision, str)
    migrated = await run_cli(env, "db", "upgrade", previous.down_revision)
    assert migrated.exit_code == 0, migrated.output
    result = await run_cli(env, *SERVE)
    assert result.exit_code == 1, result.output
    assert (
        f"the database is at revision {previous.down_revision} and this version needs "
        f"{newest}: run `memberhub db upgrade`" in result.stderr
    )
    assert served == []


async def test_serve_upgrade_applies_the_migrations_then_serves(
    tmp_path: Path, served: list[object]
) -> None:
    _, env = _fresh_sqlite_env(tmp_path)
    result = await run_cli(env, *SERVE, "--upgrade")
    assert result.exit_code == 0, result.output
    assert "applied 0001: " in result.stdout
    assert f"database is at {head()}" in result.stdout
    assert len(served) == 1
    again = await run_cli(env, *SERVE)  # at the newest now: served without a word
    assert again.exit_code == 0, again.output
    assert again.stderr == ""
    assert len(served) == 2


async def _migrated_by_a_newer_version(tmp_path: Path) -> dict[str, str | None]:
    """A SQLite database at a revision (0099) this version does not ship; its CLI env."""
    path, env = _fresh_sqlite_env(tmp_path)
    assert (await run_cli(env, "db", "upgrade")).exit_code == 0
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")
    return env


async def test_serve_runs_on_a_database_a_newer_version_migrated_with_a_warning(
    tmp_path: Path, served: list[object]
) -> None:
    env = await _migrated_by_a_newer_version(tmp_path)
    result = await run_cli(env, *SERVE)
    assert result.exit_code == 0, result.output
    assert (
        f"warning: the database is at revision 0099, newer than this version's {head()}"
        in result.stderr
    )
    assert len(served) == 1


def _main_exit(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str
) -> int | str | None:
    """Run the installed command's entry point in this process; its exit code."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["memberhub", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code


@pytest.mark.parametrize(
    "command", [("db", "upgrade"), ("apikey", "list"), SERVE, ("worker",)], ids=" ".join
)
def test_an_unreachable_database_is_one_line_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: tuple[str, ...],
) -> None:
    port = _closed_port()
    env = {
        "MEMBERHUB_DATABASE_URL": f"postgresql+asyncpg://memberhub:pw-not-shown@127.0.0.1:{port}/m",
        "MEMBERHUB_DATA_DIR": str(tmp_path / "data"),
        "MEMBERHUB_SECRET_KEY": "k" * 40,
    }
    assert _main_exit(monkeypatch, env, *command) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"error: cannot use the database at postgresql+asyncpg://memberhub:***@127.0.0.1:{port}/m:"
        f" [Errno 111] Connect call failed ('127.0.0.1', {port})"
    ]


@pytest.mark.parametrize("command", [("db", "current"), SERVE], ids=" ".join)
def test_a_sqlite_file_that_cannot_be_opened_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: tuple[str, ...],
) -> None:
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("these are notes, not a database\n" * 100)
    unopenable = tmp_path / "a-directory"
    unopenable.mkdir()
    # Checking neither creates nor changes a file.
    before = not_a_database.read_bytes()
    cases = (
        (not_a_database, "file is not a database"),
        (unopenable, "it is a directory"),
        (not_a_database / "memberhub.db", "unable to create it"),
    )
    for path, reason in cases:
        url = f"sqlite+aiosqlite:///{path}"
        env = {"MEMBERHUB_DATABASE_URL": url, "MEMBERHUB_DATA_DIR": str(tmp_path / "data")}
        assert _main_exit(monkeypatch, env, *command) == 1
        out, err = capsys.readouterr()
        assert out == ""
        (line,) = err.splitlines()
        assert line.startswith(f"error: cannot use the database at {url}: {reason}")
    assert not_a_database.read_bytes() == before


def test_a_data_directory_that_cannot_be_made_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"MEMBERHUB_DATA_DIR": str(blocker / "data")}
    assert _main_exit(monkeypatch, env, "db", "upgrade") == 1
    assert capsys.readouterr().err.splitlines() == [f"error: Not a directory: {blocker / 'data'}"]


@pytest.mark.parametrize(
    ("env", "args", "line"),
    [
        (
            {"MEMBERHUB_RATE_LIMIT": "0/minute"},
            ("db", "current"),
            "error: MEMBERHUB_RATE_LIMIT: Value error, ",
        ),
        (
            {"MEMBERHUB_DATABASE_URL": "mysql://root@127.0.0.1/m"},
            ("db", "current"),
            "error: MEMBERHUB_DATABASE_URL: Value error, the scheme 'mysql' is not one",
        ),
        ({}, ("apikey", "list"), "error: the database at sqlite+aiosqlite:///"),
        ({}, ("db", "upgrade", "9999"), "error: Can't locate revision identified by '9999'"),
        (
            {"MEMBERHUB_ENV": "production", "MEMBERHUB_SECRET_KEY": "short"},
            ("worker",),
            "error: ENV=production: the secret key must be at least 32 characters (it has 5)",
        ),
        (
            {"MEMBERHUB_REDIS_URL": "redis//:pw-not-shown@127.0.0.1:6379"},
            ("db", "current"),
            "error: MEMBERHUB_REDIS_URL: Value error, must start with redis://, rediss://",
        ),
        (
            {"MEMBERHUB_LOG_LEVEL": "verbose"},
            ("db", "current"),
            "error: MEMBERHUB_LOG_LEVEL: Value error, must be one of DEBUG, INFO, WARNING,",
        ),
        (
            {"MEMBERHUB_WORKER_INTERVAL_SECONDS": "-5"},
            ("worker",),
            "error: MEMBERHUB_WORKER_INTERVAL_SECONDS: Input should be greater than or equal",
        ),
        (
            {"MEMBERHUB_DATABASE_POOL_SIZE": "0"},
            ("db", "current"),
            "error: MEMBERHUB_DATABASE_POOL_SIZE: Input should be greater than or equal to 1",
        ),
        (
            {"MEMBERHUB_DATABASE_URL": "postgresql://u:pw-not-shown@127.0.0.1:99999/m"},
            ("db", "current"),
            "error: MEMBERHUB_DATABASE_URL: Value error, names a port outside 1 to 65535",
        ),
        (
            {"MEMBERHUB_DATABASE_URL": "postgresql://u@h/m?sslmode=require&ssl=disable"},
            ("db", "current"),
            "error: MEMBERHUB_DATABASE_URL: Value error, sets both ssl and sslmode",
        ),
    ],
    ids=[
        "bad-setting",
        "other-driver",
        "no-schema",
        "unknown-revision",
        "short-key",
        "redis",
        "log-level",
        "negative-interval",
        "no-pool",
        "port",
        "ssl-twice",
    ],
)
def test_a_mistake_of_the_operator_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    env: dict[str, str],
    args: tuple[str, ...],
    line: str,
) -> None:
    env = {
        "MEMBERHUB_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'never-migrated.db'}",
        "MEMBERHUB_DATA_DIR": str(tmp_path / "data"),
        **env,
    }
    assert _main_exit(monkeypatch, env, *args) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(line), err
    assert "pw-not-shown" not in err


def test_a_plain_postgresql_url_means_the_async_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMBERHUB_DATABASE_URL", "postgresql://u@db.example/m")
    assert Settings().resolved_database_url == "postgresql+asyncpg://u@db.example/m"
    monkeypatch.setenv("MEMBERHUB_DATABASE_URL", "postgres://u@db.example/m")
    assert Settings().resolved_database_url == "postgresql+asyncpg://u@db.example/m"
    # libpq's sslmode is asyncpg's ssl, with the same values; the rest of the URL is kept.
    monkeypatch.setenv(
        "MEMBERHUB_DATABASE_URL",
        "postgresql://u:p%40ss@db.example:6432/m?sslmode=verify-full&application_name=a",
    )
    assert Settings().resolved_database_url == (
        "postgresql+asyncpg://u:p%40ss@db.example:6432/m?application_name=a&ssl=verify-full"
    )


def test_commands_on_a_database_a_version_behind_say_to_upgrade_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Between installing a version and running `db upgrade`, tables lack their new columns.
    _, env = _fresh_sqlite_env(tmp_path)
    settings = {name: value for name, value in env.items() if value is not None}
    assert _main_exit(monkeypatch, settings, "db", "upgrade", "0001") in (0, None)
    capsys.readouterr()
    for command in (
        ("apikey", "create", "--name", "ops", "--role", "admin"),
        ("apikey", "ensure-admin"),
        ("audit", "verify"),
    ):
        assert _main_exit(monkeypatch, settings, *command) == 1
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("error: the database at sqlite+aiosqlite:///"), line
        assert line.endswith("run `memberhub db upgrade` first"), line


def test_postgresqls_missing_column_is_named_as_a_schema_behind() -> None:
    from asyncpg.exceptions import UndefinedColumnError

    from memberhub.cli import _environment_problem

    problem = _environment_problem(UndefinedColumnError('column "chain_position" does not exist'))
    assert problem is not None
    assert problem.endswith("run `memberhub db upgrade` first")


def test_a_read_only_sqlite_database_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path, env = _fresh_sqlite_env(tmp_path)
    settings = {name: value for name, value in env.items() if value is not None}
    assert _main_exit(monkeypatch, settings, "db", "upgrade") in (0, None)
    capsys.readouterr()
    read_only = f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true"
    settings["MEMBERHUB_DATABASE_URL"] = read_only
    assert _main_exit(monkeypatch, settings, "apikey", "ensure-admin") == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: cannot use the database at sqlite+aiosqlite:///file"), line
    assert line.endswith(f"{path}?mode=ro&uri=true: attempt to write a readonly database"), line


async def test_serve_on_an_address_in_use_is_one_line_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[object] = []
    monkeypatch.setattr("uvicorn.run", lambda application, **options: served.append(application))
    _, env = _fresh_sqlite_env(tmp_path)
    migrated = await run_cli(env, "db", "upgrade")
    assert migrated.exit_code == 0, migrated.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_cli(env, "serve", "--processes", "1", "--port", str(port))
    assert result.exit_code == 1, result.output
    assert "listening" not in result.stdout
    assert result.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert served == []


async def test_a_database_a_newer_version_migrated_is_left_as_it_is(
    tmp_path: Path, served: list[object]
) -> None:
    env = await _migrated_by_a_newer_version(tmp_path)
    upgraded = await run_cli(env, "db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert "nothing to apply: the database is at revision 0099, newer than" in upgraded.stdout
    current = await run_cli(env, "db", "current")
    assert "(the database is newer: a later version migrated it)" in current.stdout
    started = await run_cli(env, *SERVE, "--upgrade")  # as the image starts
    assert started.exit_code == 0, started.output
    assert len(served) == 1


async def test_serve_refuses_a_secret_key_that_cannot_read_the_stored_secrets(
    api: ApiClient, cli_env: dict[str, str | None], served: list[object]
) -> None:
    created = await api.post(
        "/api/v1/webhook-endpoints", {"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}
    )
    assert created.status_code == 201, created.text
    wrong = {**cli_env, "MEMBERHUB_SECRET_KEY": "another-key-" + "x" * 32}
    refused = await run_cli(wrong, *SERVE)
    assert refused.exit_code == 1, refused.output
    assert "the secret key cannot read the secrets stored in this database" in refused.stderr
    assert served == []
    right = {**cli_env, "MEMBERHUB_SECRET_KEY": TEST_SECRET_KEY}
    started = await run_cli(right, *SERVE)
    assert started.exit_code == 0, started.output
    assert len(served) == 1


async def test_the_worker_names_only_the_command_it_has(tmp_path: Path) -> None:
    _, env = _fresh_sqlite_env(tmp_path)
    result = await run_cli(env, "worker")
    assert result.exit_code == 1
    assert "--upgrade" not in result.stderr
    refused = await run_cli(env, "serve", "--port", "80000")
    assert refused.exit_code == 2
    assert "less than or equal to 65535" in refused.output


def test_a_fault_of_the_program_itself_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr("memberhub.cli.upgrade", broken)
    monkeypatch.setenv("MEMBERHUB_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["memberhub", "db", "upgrade"])
    with pytest.raises(ValueError, match="a bug"):
        main()


async def test_db_upgrade_defaults_to_a_database_in_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env: dict[str, str | None] = {
        "MEMBERHUB_DATABASE_URL": None,
        "MEMBERHUB_DATA_DIR": str(data_dir),
    }
    result = await run_cli(env, "db", "upgrade")
    assert result.exit_code == 0, result.output
    assert (data_dir / "memberhub.db").is_file()


async def test_apikey_create_sets_the_keys_own_rate_limit(
    cli_env: dict[str, str | None], app: object
) -> None:
    _, key = await create_key(
        cli_env, "--name", "slow", "--role", "manager", "--rate-limit", "2/minute"
    )
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        headers = {"Authorization": f"Bearer {key}"}
        statuses = [
            (await client.get("/api/v1/members", headers=headers)).status_code for _ in range(3)
        ]
    assert statuses == [200, 200, 429]


async def test_apikey_create_refuses_a_malformed_rate_limit(cli_env: dict[str, str | None]) -> None:
    result = await run_cli(
        cli_env, "apikey", "create", "--name", "x", "--role", "manager", "--rate-limit", "fast"
    )
    assert result.exit_code == 1
    assert "not a rate limit" in result.output
