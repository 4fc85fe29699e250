"""Backups: a consistent copy of a running installation in one file, and its restore.

A backup is a gzip-compressed tar archive holding:

- `manifest.json`: the format version, when and from which memberhub version it was made,
  the database kind, the schema revision, and the fingerprint of the master secret's
  derived key (the same fingerprint every encrypted value in the database carries, so it
  reveals nothing new);
- `database.sqlite` (SQLite's online backup API: a consistent snapshot while the service
  writes) or `database.dump` (`pg_dump --format=custom`, one consistent snapshot);
- `secret_key.sealed`, unless made without it: the master secret sealed with a passphrase
  (`kit/sealing.py`). Without the secret a restored database's stored credentials and
  audit chain cannot be read, so a backup carries it unless told otherwise.

A restore refuses to overwrite a database that holds data or a different secret key unless
forced, and never leaves a half-written SQLite file in place: the copy is checked and then
moved in.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from memberhub import __version__
from memberhub.kit.crypto import SecretBox
from memberhub.kit.sealing import open_secret

FORMAT = "memberhub-backup"
VERSION = 1
MANIFEST = "manifest.json"
SQLITE_MEMBER = "database.sqlite"
POSTGRES_MEMBER = "database.dump"
SECRET_MEMBER = "secret_key.sealed"


class BackupError(Exception):
    """A backup cannot be made or restored; the message says why and what to do."""


@dataclass(frozen=True)
class Manifest:
    database: str  # "sqlite" or "postgresql"
    schema_revision: str | None
    key_fingerprint: str
    has_secret_key: bool
    created_at: str
    memberhub_version: str

    def as_json(self) -> bytes:
        document = {"format": FORMAT, "version": VERSION, **self.__dict__}
        return json.dumps(document, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            document: Any = json.loads(raw)
        except ValueError:
            raise BackupError("the backup's manifest is not JSON") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise BackupError("not a memberhub backup")
        if document.get("version") != VERSION:
            raise BackupError(f"backup format version {document.get('version')!r} is not supported")
        try:
            return cls(
                database=str(document["database"]),
                schema_revision=document["schema_revision"],
                key_fingerprint=str(document["key_fingerprint"]),
                has_secret_key=bool(document["has_secret_key"]),
                created_at=str(document["created_at"]),
                memberhub_version=str(document["memberhub_version"]),
            )
        except KeyError as exc:
            raise BackupError(f"the backup's manifest lacks {exc.args[0]!r}") from None


def key_fingerprint(secret: str) -> str:
    return SecretBox(secret).key_id


def database_kind(database_url: str) -> str:
    backend = make_url(database_url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BackupError(f"backups support SQLite and PostgreSQL, not {backend}")
    return backend


def _sqlite_path(database_url: str) -> Path:
    path = make_url(database_url).database
    if not path or path == ":memory:":
        raise BackupError("an in-memory SQLite database cannot be backed up")
    return Path(path)


# ---------------------------------------------------------------- PostgreSQL tools


def _libpq(database_url: str) -> tuple[list[str], dict[str, str]]:
    """pg_dump/pg_restore connection arguments for a SQLAlchemy URL; the password goes in
    the environment (PGPASSWORD), never on a command line other users can read."""
    url: URL = make_url(database_url)
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    args = ["--dbname", url.database or "postgres"]
    if url.host:
        args += ["--host", url.host]
    if url.port:
        args += ["--port", str(url.port)]
    if url.username:
        args += ["--username", url.username]
    ssl = url.query.get("ssl") or url.query.get("sslmode")
    if isinstance(ssl, str):
        env["PGSSLMODE"] = {"true": "require", "false": "disable"}.get(ssl.lower(), ssl)
    return args, env


def _run_tool(command: list[str], env: Mapping[str, str]) -> None:
    if shutil.which(command[0]) is None:
        raise BackupError(
            f"{command[0]} is not installed: install the PostgreSQL client tools "
            "(the same major version as the server or newer)"
        )
    result = subprocess.run(command, env=dict(env), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = result.stderr.strip() or f"exit code {result.returncode}"
        raise BackupError(f"{command[0]} failed: {message}")


# ---------------------------------------------------------------- create


def _schema_revision_sqlite(path: Path) -> str | None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            return None
    return str(row[0]) if row else None


def _snapshot_sqlite(source: Path, target: Path) -> None:
    if not source.exists():
        raise BackupError(f"there is no database at {source}")
    # Opened read-only, so a mistyped path never creates an empty database. The backup API
    # copies a consistent snapshot while the service goes on writing (WAL readers do not
    # block writers).
    with (
        contextlib.closing(
            sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        ) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")


def create_backup(
    database_url: str,
    secret: str,
    destination: Path,
    *,
    sealed_secret: bytes | None,
    schema_revision: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write a backup of the database at `database_url` to `destination`.

    `sealed_secret`: the master secret sealed with a passphrase, or None to leave it out.
    `schema_revision`: for PostgreSQL, the revision read by the caller (SQLite's is read
    from the snapshot itself).
    """
    kind = database_kind(database_url)
    if destination.exists() and not overwrite:
        raise BackupError(f"{destination} exists; choose another file or pass --force")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".backup-") as work_dir:
        work = Path(work_dir)
        if kind == "sqlite":
            snapshot = work / SQLITE_MEMBER
            _snapshot_sqlite(_sqlite_path(database_url), snapshot)
            schema_revision = _schema_revision_sqlite(snapshot)
        else:
            snapshot = work / POSTGRES_MEMBER
            args, env = _libpq(database_url)
            _run_tool(
                ["pg_dump", "--format=custom", "--no-owner", "--file", str(snapshot), *args], env
            )
        manifest = Manifest(
            database=kind,
            schema_revision=schema_revision,
            key_fingerprint=key_fingerprint(secret),
            has_secret_key=sealed_secret is not None,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            memberhub_version=__version__,
        )
        partial = work / "backup.tar.gz"
        with tarfile.open(partial, "w:gz") as archive:
            _add_bytes(archive, MANIFEST, manifest.as_json())
            archive.add(snapshot, arcname=snapshot.name)
            if sealed_secret is not None:
                _add_bytes(archive, SECRET_MEMBER, sealed_secret)
        partial.chmod(0o600)
        os.replace(partial, destination)
    return manifest


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(datetime.now(UTC).timestamp())
    archive.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- restore


@dataclass(frozen=True)
class RestoreReport:
    manifest: Manifest
    secret_key_written: Path | None
    needs_upgrade: bool


@contextlib.contextmanager
def _opened(source: Path) -> Iterator[tarfile.TarFile]:
    if not source.is_file():
        raise BackupError(f"there is no backup file at {source}")
    try:
        archive = tarfile.open(source, "r:gz")  # noqa: SIM115 - closed below, after the check
    except (tarfile.TarError, OSError) as exc:
        raise BackupError(f"{source} is not a memberhub backup: {exc}") from None
    with archive:
        try:
            yield archive
        except (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError) as exc:
            # Members are read (and staged) before anything is replaced: a file cut short
            # or damaged past its first blocks changes nothing.
            raise BackupError(f"{source} is truncated or damaged: {exc}") from None


def _read_member(archive: tarfile.TarFile, name: str) -> bytes | None:
    try:
        info = archive.getmember(name)
    except KeyError:
        return None
    if not info.isfile():
        raise BackupError(f"the backup's {name} is not a regular file")
    extracted = archive.extractfile(info)
    if extracted is None:
        raise BackupError(f"the backup's {name} cannot be read")
    with extracted:
        return extracted.read()


def _copy_member(archive: tarfile.TarFile, name: str, target: Path) -> None:
    try:
        info = archive.getmember(name)
    except KeyError:
        raise BackupError(f"the backup has no {name}") from None
    extracted = archive.extractfile(info) if info.isfile() else None
    if extracted is None:
        raise BackupError(f"the backup's {name} cannot be read")
    with extracted, target.open("wb") as out:
        shutil.copyfileobj(extracted, out, 1024 * 1024)


def read_manifest(source: Path) -> Manifest:
    with _opened(source) as archive:
        raw = _read_member(archive, MANIFEST)
    if raw is None:
        raise BackupError("not a memberhub backup (it has no manifest)")
    return Manifest.from_json(raw)


def _sqlite_holds_data(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as c:
        tables = c.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchone()[0]
    return bool(tables)


def _sqlite_in_use(path: Path) -> bool:
    """Whether another process has the database at `path` open. The service keeps it open
    in WAL mode, and SQLite leaves WAL mode only for a connection that is alone with the
    database; left, the database is about to be replaced anyway."""
    with contextlib.closing(sqlite3.connect(path, timeout=0)) as conn:
        try:
            conn.execute("PRAGMA journal_mode=DELETE").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return True
            raise
    return False


def _restore_sqlite(archive: tarfile.TarFile, database_url: str, *, force: bool) -> None:
    target = _sqlite_path(database_url)
    if _sqlite_holds_data(target):
        if not force:
            raise BackupError(
                f"{target} already holds a database; restore into an empty data directory or "
                "pass --force to replace it (stop the service first)"
            )
        if _sqlite_in_use(target):
            raise BackupError(
                f"another process has {target} open (the service or a worker?): stop it "
                "first; a restore would replace the database under it"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".restore-") as work_dir:
        staged = Path(work_dir) / target.name
        _copy_member(archive, SQLITE_MEMBER, staged)
        with contextlib.closing(sqlite3.connect(staged)) as conn:
            verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if verdict != "ok":
            raise BackupError(f"the backup's database fails SQLite's integrity check: {verdict}")
        for suffix in ("-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        os.replace(staged, target)


def postgres_holds_data_query() -> str:
    return (
        "SELECT count(*) FROM pg_catalog.pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
    )


def postgres_other_sessions_query() -> str:
    """Who else is connected to the database: one row per session, named by its
    application (the service's connections say `memberhub`)."""
    return (
        "SELECT coalesce(nullif(application_name, ''), 'unnamed') FROM pg_catalog.pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend'"
    )


def _restore_postgres(
    archive: tarfile.TarFile,
    database_url: str,
    *,
    holds_data: bool,
    other_sessions: Sequence[str],
    force: bool,
) -> None:
    if holds_data and not force:
        raise BackupError(
            "the database already holds tables; restore into an empty database or pass "
            "--force to replace what the backup has (stop the service first)"
        )
    if holds_data and other_sessions:
        names = ", ".join(
            f"{name} x{count}" if count > 1 else name
            for name, count in sorted(Counter(other_sessions).items())
        )
        raise BackupError(
            f"{len(other_sessions)} other sessions are connected to the database ({names}): "
            "stop the service and its workers first; a restore would replace the data under them"
        )
    args, env = _libpq(database_url)
    with tempfile.TemporaryDirectory(prefix="memberhub-restore-") as work_dir:
        dump = Path(work_dir) / POSTGRES_MEMBER
        _copy_member(archive, POSTGRES_MEMBER, dump)
        if not holds_data:
            command = ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error"]
            _run_tool([*command, "--single-transaction", *args, str(dump)], env)
            return
        # --force replaces everything: what the database holds is dropped (tables a newer
        # migration made included, whatever refers to what) and the backup loaded, in one
        # transaction, so a restore that fails leaves the database as it was. pg_restore
        # cannot run a statement of its own first: its script runs through psql, after one.
        script = Path(work_dir) / "restore.sql"
        _run_tool(
            ["pg_restore", "--no-owner", "--no-privileges", "--file", str(script), str(dump)],
            env,
        )
        _run_tool(
            [
                "psql",
                "--no-psqlrc",
                "--quiet",
                "--single-transaction",
                "--set",
                "ON_ERROR_STOP=1",
                "--command",
                _DROP_EVERYTHING,
                "--file",
                str(script),
                *args,
            ],
            env,
        )


# Every schema of the database's own (not PostgreSQL's) dropped with what it holds; the
# public schema, which a dump assumes, made again.
_DROP_EVERYTHING = """
DO $$
DECLARE
    name text;
BEGIN
    FOR name IN
        SELECT nspname FROM pg_catalog.pg_namespace
        WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
    LOOP
        EXECUTE format('DROP SCHEMA %I CASCADE', name);
    END LOOP;
END $$;
CREATE SCHEMA public;
"""


def restore_backup(
    source: Path,
    database_url: str,
    *,
    data_dir: Path,
    configured_secret: str | None,
    passphrase: str | None,
    postgres_holds_data: bool = False,
    postgres_other_sessions: Sequence[str] = (),
    force: bool = False,
    head_revision: str | None = None,
) -> RestoreReport:
    """Restore `source` into the database at `database_url`.

    The secret: with `configured_secret` (MEMBERHUB_SECRET_KEY) set, it must be the one the
    backup was made with. Otherwise the backup's sealed secret (opened with `passphrase`)
    goes to `data_dir/secret_key`, which must be absent or hold the same secret unless
    `force`. Everything about the secret is checked before the database is touched.
    """
    kind = database_kind(database_url)
    with _opened(source) as archive:
        raw = _read_member(archive, MANIFEST)
        if raw is None:
            raise BackupError("not a memberhub backup (it has no manifest)")
        manifest = Manifest.from_json(raw)
        if manifest.database != kind:
            raise BackupError(
                f"this is a {manifest.database} backup; it restores only into a "
                f"{manifest.database} database, and the configured one is {kind}"
            )
        secret_to_write = _secret_for_restore(
            archive, manifest, data_dir, configured_secret, passphrase, force=force
        )
        if kind == "sqlite":
            _restore_sqlite(archive, database_url, force=force)
        else:
            _restore_postgres(
                archive,
                database_url,
                holds_data=postgres_holds_data,
                other_sessions=postgres_other_sessions,
                force=force,
            )
    written = None
    if secret_to_write is not None:
        written = data_dir / "secret_key"
        data_dir.mkdir(parents=True, exist_ok=True)
        staged = written.with_suffix(".restored")
        staged.unlink(missing_ok=True)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secret_to_write)
        os.replace(staged, written)
    needs_upgrade = head_revision is not None and manifest.schema_revision != head_revision
    return RestoreReport(manifest=manifest, secret_key_written=written, needs_upgrade=needs_upgrade)


def _secret_for_restore(
    archive: tarfile.TarFile,
    manifest: Manifest,
    data_dir: Path,
    configured_secret: str | None,
    passphrase: str | None,
    *,
    force: bool,
) -> str | None:
    """The secret to write to the data directory (None: nothing to write), after checking
    that the installation will be able to read what the backup encrypted."""
    if configured_secret is not None:
        if key_fingerprint(configured_secret) != manifest.key_fingerprint and not force:
            raise BackupError(
                "MEMBERHUB_SECRET_KEY is not the secret this backup was made with: stored "
                "credentials and the audit chain would be unreadable. Set it to the backup's "
                "secret (or unset it to use the one sealed in the backup), or pass --force"
            )
        return None
    key_file = data_dir / "secret_key"
    existing = key_file.read_text().strip() if key_file.exists() else None
    if not manifest.has_secret_key:
        holds_it = existing is not None and key_fingerprint(existing) == manifest.key_fingerprint
        if not holds_it and not force:
            raise BackupError(
                "this backup was made without its secret key and the data directory "
                "does not hold it: put the secret in place first (`memberhub secrets "
                "import`, or MEMBERHUB_SECRET_KEY), or pass --force"
            )
        return None
    if passphrase is None:
        raise BackupError("the backup's secret key is sealed: give its passphrase")
    sealed = _read_member(archive, SECRET_MEMBER)
    if sealed is None:
        raise BackupError("the manifest names a sealed secret key but the backup has none")
    secret = open_secret(sealed, passphrase)
    if key_fingerprint(secret) != manifest.key_fingerprint:
        raise BackupError("the sealed secret key does not match the backup's database")
    if existing is not None and existing != secret and not force:
        raise BackupError(
            f"{key_file} holds a different secret key; restore into a fresh data directory, "
            "or pass --force to replace it"
        )
    return None if existing == secret else secret
