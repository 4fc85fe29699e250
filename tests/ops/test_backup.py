"""Backups: `memberhub backup create/restore` and `memberhub secrets export/import`, run as
an operator runs them, against a service that is writing while the backup is made.

What changes something runs as its own process (`_cli`); a refusal, which must change
nothing, runs in this process (`_refused`): each process started costs a second of imports."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
import stripe
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from memberhub.cli import app as cli_app
from memberhub.integrations.vault import unseal
from memberhub.kit.crypto import SecretBox
from memberhub.kit.sealing import SealError, open_secret, seal_secret
from tests.test_processes import (
    MEMBERHUB,
    _free_port,
    _start,
    _stop,
    _wait_for_health,
)

PASSPHRASE = "correct horse battery staple"
# One API process (with the embedded worker): how many the service runs is tested elsewhere
# (tests/test_processes.py), and each more would only take a core from the test.
SERVE_ONE_PROCESS = ["serve", "--processes", "1", "--host", "127.0.0.1", "--port"]
WEBHOOK_SECRET = "whsec_backup_test_0123456789"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MEMBERHUB, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _refused(env: dict[str, str], *args: str) -> str:
    """Run a command that must be refused, in this process with `env` as its whole
    environment for memberhub's settings; its error output."""
    unset: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith("MEMBERHUB_") and name not in env
    }
    result = CliRunner().invoke(cli_app, list(args), env={**unset, **env})
    assert result.exit_code == 1, result.output
    return result.stderr


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _postgres(url: str, statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def _fetch(url: str, query: str) -> list[tuple[object, ...]]:
    """Rows from either database, read with the drivers the service does not share."""
    if url.startswith("sqlite"):
        import sqlite3

        path = make_url(url).database
        assert path
        # Closed at once: to a restore, a connection left open looks like a running service.
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return [tuple(row) for row in conn.execute(query).fetchall()]

    async def run() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=10)
        try:
            return [tuple(row) for row in await conn.fetch(query)]
        finally:
            await conn.close()

    return asyncio.run(run())


def _stripe_event(event_id: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {"id": event_id, "type": "customer.created", "object": "event", "data": {"object": {}}}
    )
    header = stripe.WebhookSignature.generate_signature_header(body, WEBHOOK_SECRET)
    return body.encode(), {"Stripe-Signature": header, "Content-Type": "application/json"}


def test_backup_of_a_running_service_restores_into_a_fresh_installation(
    process_env: dict[str, str], admin_key: str, database_url: str, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {admin_key}"}
    port = _free_port()
    server = _start([*SERVE_ONE_PROCESS, str(port)], process_env)
    base = f"http://127.0.0.1:{port}"
    backup = tmp_path / "backups" / "memberhub.tar.gz"
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSPHRASE + "\n")
    awards = 0
    try:
        _wait_for_health(base, server)
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            integration = client.post(
                "/api/v1/integrations",
                json={
                    "provider": "stripe",
                    "name": "Stripe",
                    "config": {},
                    "credentials": {"api_key": "sk_test_backup", "webhook_secret": WEBHOOK_SECRET},
                },
            )
            assert integration.status_code == 201, integration.text
            member = client.post("/api/v1/members", json={"email": "kept@example.com"}).json()

            # Awards go on while the backup is made: the copy is one consistent moment.
            stop = threading.Event()

            failures: list[str] = []

            def keep_awarding() -> None:
                nonlocal awards
                while not stop.is_set():
                    body = {"member_id": member["id"], "points": 5, "reason": "during backup"}
                    started = time.monotonic()
                    try:
                        response = client.post("/api/v1/points/award", json=body)
                    except httpx.HTTPError as exc:
                        failures.append(f"after {time.monotonic() - started:.1f}s: {exc!r}")
                        return
                    if response.status_code != 201:
                        failures.append(response.text)
                        return
                    awards += 1

            writer = threading.Thread(target=keep_awarding)
            writer.start()
            try:
                while awards < 20:
                    time.sleep(0.01)
                made = _cli(
                    process_env,
                    "backup",
                    "create",
                    str(backup),
                    "--passphrase-file",
                    str(passphrase_file),
                )
            finally:
                stop.set()
                writer.join()
        assert made.returncode == 0, made.stderr
        assert "written to" in made.stdout
        assert failures == [], "the service stopped answering while the backup ran"
    finally:
        _stop(server)
    assert awards >= 20
    assert backup.stat().st_mode & 0o777 == 0o600
    # The secret is in the archive only sealed.
    secret = (Path(process_env["MEMBERHUB_DATA_DIR"]) / "secret_key").read_text().strip()
    with tarfile.open(backup) as archive:
        names = set(archive.getnames())
        for name in names:
            extracted = archive.extractfile(name)
            assert extracted is not None
            assert secret.encode() not in extracted.read()
    assert names == {
        "manifest.json",
        "secret_key.sealed",
        "database.sqlite" if database_url.startswith("sqlite") else "database.dump",
    }

    # A fresh installation: a new data directory and an empty database.
    fresh_data = tmp_path / "fresh"
    restored_env = {**process_env, "MEMBERHUB_DATA_DIR": str(fresh_data)}
    restored_url = f"sqlite+aiosqlite:///{fresh_data / 'memberhub.db'}"
    if not database_url.startswith("sqlite"):
        name = f"mh_restore_{uuid.uuid4().hex[:12]}"
        _postgres(database_url, f'CREATE DATABASE "{name}"')
        restored_url = make_url(database_url).set(database=name).render_as_string(False)
    restored_env["MEMBERHUB_DATABASE_URL"] = restored_url
    try:
        no_passphrase = _cli(restored_env, "backup", "restore", str(backup))
        assert no_passphrase.returncode == 1
        assert "passphrase" in no_passphrase.stderr
        wrong = tmp_path / "wrong"
        wrong.write_text("not the passphrase at all\n")
        refused = _refused(
            restored_env, "backup", "restore", str(backup), "--passphrase-file", str(wrong)
        )
        assert "wrong passphrase" in refused
        assert not (fresh_data / "secret_key").exists()

        restored = _cli(
            restored_env,
            "backup",
            "restore",
            str(backup),
            "--passphrase-file",
            str(passphrase_file),
        )
        assert restored.returncode == 0, restored.stderr
        assert (fresh_data / "secret_key").read_text() == secret
        assert (fresh_data / "secret_key").stat().st_mode & 0o777 == 0o600

        verified = _cli(restored_env, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr

        # Consistent: the balance is the sum of the ledger rows copied with it.
        (balance,) = _fetch(restored_url, "SELECT current FROM point_accounts")[0]
        (credited,) = _fetch(restored_url, "SELECT sum(points) FROM point_transactions")[0]
        assert balance == credited
        assert isinstance(balance, int)
        assert 0 < balance <= awards * 5
        # The integration's credentials decrypt with the restored secret…
        (stored,) = _fetch(restored_url, "SELECT credentials FROM integrations")[0]
        assert isinstance(stored, str)
        assert unseal(SecretBox(secret), stored)["webhook_secret"] == WEBHOOK_SECRET

        # …and the restored service verifies a webhook signed with them.
        port = _free_port()
        again = _start([*SERVE_ONE_PROCESS, str(port)], restored_env)
        try:
            _wait_for_health(f"http://127.0.0.1:{port}", again)
            body, signed = _stripe_event("evt_after_restore")
            accepted = httpx.post(
                f"http://127.0.0.1:{port}/api/v1/inbound/{integration.json()['id']}",
                content=body,
                headers=signed,
                timeout=10,
            )
            assert accepted.status_code in (200, 202), accepted.text
            # Replacing the database under the running service is refused, and changes
            # nothing.
            under_service = _refused(
                restored_env,
                "backup",
                "restore",
                str(backup),
                "--passphrase-file",
                str(passphrase_file),
                "--force",
            )
            assert "stop" in under_service
            assert "memberhub" in under_service or "open" in under_service
        finally:
            _stop(again)
        inbound = (
            "SELECT count(*) FROM inbound_events WHERE provider_event_id = 'evt_after_restore'"
        )
        assert _fetch(restored_url, inbound) == [(1,)]

        # Restoring over an installation that holds data is refused without --force.
        twice = _refused(
            restored_env,
            "backup",
            "restore",
            str(backup),
            "--passphrase-file",
            str(passphrase_file),
        )
        assert "--force" in twice
        # With the service stopped, --force puts back the backup's moment: what came after
        # is gone, and the chain checks.
        forced = _cli(
            restored_env,
            "backup",
            "restore",
            str(backup),
            "--passphrase-file",
            str(passphrase_file),
            "--force",
        )
        assert forced.returncode == 0, forced.stderr
        assert _fetch(restored_url, inbound) == [(0,)]
        assert _fetch(restored_url, "SELECT current FROM point_accounts")[0] == (balance,)
        verified = _cli(restored_env, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        if not database_url.startswith("sqlite"):
            _postgres(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_backup_without_its_secret_key_restores_only_where_the_key_is(
    process_env: dict[str, str], admin_key: str, tmp_path: Path
) -> None:
    env = process_env
    made = _cli(env, "backup", "create", str(tmp_path / "plain.tar.gz"), "--without-secret-key")
    assert made.returncode == 0, made.stderr
    assert "NOT in it" in made.stdout
    exported = _cli(env, "secrets", "export", str(tmp_path / "key.sealed"))
    # No terminal and no passphrase: a clear refusal, no file.
    assert exported.returncode == 2
    assert "passphrase" in exported.stderr
    assert not (tmp_path / "key.sealed").exists()
    exported = _cli(
        {**env, "MEMBERHUB_BACKUP_PASSPHRASE": PASSPHRASE},
        "secrets",
        "export",
        str(tmp_path / "key.sealed"),
    )
    assert exported.returncode == 0, exported.stderr

    fresh = tmp_path / "fresh-sqlite"
    fresh_env = {
        **env,
        "MEMBERHUB_DATA_DIR": str(fresh),
        "MEMBERHUB_DATABASE_URL": f"sqlite+aiosqlite:///{fresh / 'memberhub.db'}",
    }
    if not env["MEMBERHUB_DATABASE_URL"].startswith("sqlite"):
        # The kinds must agree: a PostgreSQL backup never lands in SQLite.
        crossed = _refused(fresh_env, "backup", "restore", str(tmp_path / "plain.tar.gz"))
        assert "restores only into a postgresql database" in crossed
        return
    refused = _refused(fresh_env, "backup", "restore", str(tmp_path / "plain.tar.gz"))
    assert "without its secret key" in refused
    assert not (fresh / "memberhub.db").exists()

    imported = _cli(
        {**fresh_env, "MEMBERHUB_BACKUP_PASSPHRASE": PASSPHRASE},
        "secrets",
        "import",
        str(tmp_path / "key.sealed"),
    )
    assert imported.returncode == 0, imported.stderr
    # A copy cut short (an interrupted transfer) is refused as such, and nothing is made.
    whole = (tmp_path / "plain.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) * 3 // 5])
    cut = _refused(fresh_env, "backup", "restore", str(tmp_path / "cut.tar.gz"))
    assert cut.strip().splitlines() == [
        f"error: {tmp_path / 'cut.tar.gz'} is truncated or damaged: "
        "Compressed file ended before the end-of-stream marker was reached"
    ]
    assert not (fresh / "memberhub.db").exists()
    restored = _cli(fresh_env, "backup", "restore", str(tmp_path / "plain.tar.gz"))
    assert restored.returncode == 0, restored.stderr
    verified = _cli(fresh_env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_restore_refuses_what_is_not_a_backup(process_env: dict[str, str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(os.urandom(64))
    assert "not a memberhub backup" in _refused(process_env, "backup", "restore", str(junk))
    missing = _refused(process_env, "backup", "restore", str(tmp_path / "absent.tar.gz"))
    assert "no backup file" in missing


def test_a_sealed_secret_opens_only_with_its_passphrase_and_unaltered() -> None:
    sealed = seal_secret("the master secret", PASSPHRASE)
    assert b"the master secret" not in sealed
    assert open_secret(sealed, PASSPHRASE) == "the master secret"
    with pytest.raises(SealError, match="wrong passphrase"):
        open_secret(sealed, PASSPHRASE + "!")
    document = json.loads(sealed)
    document["ciphertext"] = document["ciphertext"][:-4] + "AAA="
    with pytest.raises(SealError):
        open_secret(json.dumps(document).encode(), PASSPHRASE)
    with pytest.raises(SealError, match="not a sealed secret"):
        open_secret(b"[]", PASSPHRASE)
    with pytest.raises(SealError, match="at least"):
        seal_secret("x", "short")


def _execute(url: str, *statements: str) -> None:
    if url.startswith("sqlite"):
        import sqlite3

        path = make_url(url).database
        assert path
        with contextlib.closing(sqlite3.connect(path)) as conn:
            for statement in statements:
                conn.execute(statement)
            conn.commit()
        return
    for statement in statements:
        _postgres(url, statement)


def test_a_forced_restore_leaves_nothing_the_backup_does_not_have(
    process_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    """--force replaces what is there: a table made after the backup (a newer version's
    migration, one that refers to the members) is gone, so `db upgrade` makes it again."""
    data = tmp_path / "installation"
    url = f"sqlite+aiosqlite:///{data / 'memberhub.db'}"
    name = None
    if not database_url.startswith("sqlite"):
        name = f"mh_force_{uuid.uuid4().hex[:12]}"
        _postgres(database_url, f'CREATE DATABASE "{name}"')
        url = make_url(database_url).set(database=name).render_as_string(False)
    env = {**process_env, "MEMBERHUB_DATA_DIR": str(data), "MEMBERHUB_DATABASE_URL": url}
    try:
        assert _cli(env, "db", "upgrade").returncode == 0
        backup = tmp_path / "plain.tar.gz"
        made = _cli(env, "backup", "create", str(backup), "--without-secret-key")
        assert made.returncode == 0, made.stderr
        _execute(
            url,
            "CREATE TABLE later_feature (id integer PRIMARY KEY, "
            "member_id bigint REFERENCES members(id))",
            "INSERT INTO later_feature (id) VALUES (7)",
        )

        forced = _cli(env, "backup", "restore", str(backup), "--force")
        assert forced.returncode == 0, forced.stderr

        tables = (
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            if name is None
            else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
        held = {row[0] for row in _fetch(url, tables)}
        assert "later_feature" not in held
        assert {"members", "point_transactions", "alembic_version"} <= held
        upgraded = _cli(env, "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr

        # A backup a newer version made (a schema this one does not know) is refused before
        # anything is touched.
        newer = tmp_path / "newer.tar.gz"
        with tarfile.open(backup) as source, tarfile.open(newer, "w:gz") as target:
            for member in source.getmembers():
                content = source.extractfile(member)
                assert content is not None
                raw = content.read()
                if member.name == "manifest.json":
                    manifest = json.loads(raw)
                    manifest["schema_revision"] = "f0f0f0f0f0f0"
                    raw = json.dumps(manifest).encode()
                    member.size = len(raw)
                target.addfile(member, io.BytesIO(raw))
        refused = _refused(env, "backup", "restore", str(newer), "--force")
        assert "made by a newer version of memberhub" in refused
        assert "f0f0f0f0f0f0" in refused
        assert {"members", "alembic_version"} <= {row[0] for row in _fetch(url, tables)}
    finally:
        if name is not None:
            _postgres(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
