"""The `memberhub` command."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import sqlalchemy.exc
import typer

from memberhub import __version__
from memberhub.auth.roles import Role
from memberhub.kit.actor import Actor
from memberhub.kit.cache import STAMP_FILE, ProcessCache
from memberhub.kit.db import DATABASE_GONE, Database
from memberhub.kit.errors import MemberhubError
from memberhub.kit.migrate import SchemaState, current, head, schema_state, shipped, upgrade
from memberhub.kit.startup import collect_less, long_lived
from memberhub.ops.tracking import configure_error_tracking
from memberhub.settings import Environment, SecretKeyMissing, Settings

if TYPE_CHECKING:
    from memberhub.audit.chain import ChainHead

app = typer.Typer(help="memberhub: members, memberships and loyalty.", no_args_is_help=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"memberhub {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """memberhub: members, memberships and loyalty."""


db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)
secrets_app = typer.Typer(help="The master secret and what it encrypts.", no_args_is_help=True)
backup_app = typer.Typer(help="Backups of the database and its secret.", no_args_is_help=True)
staff_app = typer.Typer(help="Staff accounts for the console.", no_args_is_help=True)
export_app = typer.Typer(help="Exported data.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(apikey_app, name="apikey")
app.add_typer(audit_app, name="audit")
app.add_typer(secrets_app, name="secrets")
app.add_typer(backup_app, name="backup")
app.add_typer(staff_app, name="staff")
app.add_typer(export_app, name="export")

CLI_ACTOR = Actor.system("cli")
MIN_SECRET_LENGTH = 32
T = TypeVar("T")


def main() -> None:
    """The `memberhub` command. What goes wrong outside the program (a database it cannot
    reach or that has no schema, a setting it refuses, a port taken) is reported in one
    line, not as a traceback."""
    collect_less()
    try:
        app()
    except Exception as exc:
        problem = _environment_problem(exc)
        if problem is None:
            raise
        typer.echo(f"error: {problem}", err=True)
        raise SystemExit(1) from None


def _environment_problem(exc: BaseException) -> str | None:
    """What went wrong outside the program, in a line; None for anything else."""
    from alembic.util import CommandError
    from asyncpg.exceptions import UndefinedColumnError, UndefinedTableError
    from pydantic import ValidationError

    refused = (*DATABASE_GONE, TimeoutError)  # a connection attempt timing out, too
    cause: BaseException | None = exc
    while cause is not None:
        sqlite_says = str(cause) if isinstance(cause, sqlalchemy.exc.OperationalError) else ""
        if isinstance(cause, refused) or any(
            problem in sqlite_says
            for problem in ("unable to open database file", "attempt to write a readonly database")
        ):
            return f"cannot use the database at {_database_shown()}: {_reason(cause)}"
        # A database a version behind (`db upgrade` not run yet) lacks tables or columns.
        if isinstance(cause, UndefinedTableError | UndefinedColumnError) or any(
            problem in sqlite_says
            for problem in ("no such table", "no such column", "has no column")
        ):
            return (
                f"the database at {_database_shown()} lacks this version's tables "
                f"({_reason(cause)}): run `memberhub db upgrade` first"
            )
        if isinstance(cause, ValidationError) and cause.title == "Settings":
            return "; ".join(
                f"MEMBERHUB_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
                for error in cause.errors()
            )
        if isinstance(cause, SecretKeyMissing | CommandError):
            return str(cause)
        if isinstance(cause, OSError) and cause.filename is not None:
            return f"{cause.strerror or type(cause).__name__}: {cause.filename}"
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            return f"the address is already in use ({cause.strerror})"
        if type(cause).__name__ == "BadDsn":  # sentry_sdk's, loaded only with SENTRY_DSN
            return f"MEMBERHUB_SENTRY_DSN is not a Sentry DSN: {cause}"
        cause = cause.__cause__ or cause.__context__
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _database_shown() -> str:
    """The configured database's address, without its password."""
    from sqlalchemy.engine import make_url

    try:
        url = Settings().resolved_database_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "MEMBERHUB_DATABASE_URL"


def _settings() -> Settings:
    settings = Settings()
    if settings.is_sqlite:
        settings.ensure_data_dir()
        _require_openable_sqlite(settings.resolved_database_url)
    return settings


def _require_openable_sqlite(url: str) -> None:
    """Open a SQLite database file once with the standard library first: a path that
    cannot be opened is then one line, before the async driver's thread fails on it."""
    import sqlite3

    from sqlalchemy.engine import make_url

    name = make_url(url).database
    if not name or name == ":memory:" or name.startswith("file:"):
        return
    path = Path(name)
    problem = None
    if path.is_dir():
        problem = "it is a directory, not a database file"
    elif path.exists():
        # Read-only: checking creates and changes nothing.
        uri = f"{path.resolve().as_uri()}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
                conn.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as exc:
            problem = str(exc)
    elif not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        problem = f"unable to create it: {path.parent} is not a directory it can write in"
    if problem is not None:
        typer.echo(f"error: cannot use the database at {url}: {problem}", err=True)
        raise typer.Exit(code=1)


def _require_secret_key(settings: Settings) -> None:
    """Resolve the secret (creating it outside production) before anything runs."""
    try:
        secret = settings.resolved_secret_key
    except SecretKeyMissing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    if settings.env == Environment.production and len(secret) < MIN_SECRET_LENGTH:
        typer.echo(
            f"error: ENV=production: the secret key must be at least {MIN_SECRET_LENGTH} "
            f"characters (it has {len(secret)}); see `memberhub secrets rotate` to change it",
            err=True,
        )
        raise typer.Exit(code=1)


def _require_schema(
    settings: Settings, *, upgrade_first: bool = False, can_upgrade: bool = False
) -> None:
    """Serve or work only on the schema this version ships: with `upgrade_first`, apply the
    pending migrations (as `db upgrade` does); otherwise refuse a database that was never
    migrated or lacks this version's migrations, naming the command that fixes it. A
    database a newer version migrated is served with a warning (a rolling upgrade), with
    `upgrade_first` too: there is nothing this version could apply to it."""
    state = schema_state(settings.resolved_database_url)
    if upgrade_first and not state.unknown:
        _apply_migrations(settings, state=state)
        return
    fix = "run `memberhub db upgrade` first" + (" (or start with --upgrade)" if can_upgrade else "")
    if state.never_migrated:
        typer.echo(f"error: the database has no schema yet: {fix}", err=True)
        raise typer.Exit(code=1)
    if state.behind:
        typer.echo(
            f"error: the database is at revision {', '.join(state.at)} and this version "
            f"needs {state.newest}: {fix}",
            err=True,
        )
        raise typer.Exit(code=1)
    if state.unknown:
        typer.echo(
            f"warning: the database is at revision {', '.join(state.unknown)}, newer than "
            f"this version's {state.newest}: running on it, as during a rolling upgrade",
            err=True,
        )


def _require_readable_secrets(settings: Settings) -> None:
    """Refuse to start with a secret key that cannot read the secrets stored in the database
    (after `secrets rotate`, started with the old key): every request needing one would
    fail. One stored secret of each kind is tried."""
    from sqlalchemy import select

    from memberhub.integrations.models import Integration
    from memberhub.kit.crypto import SecretBox, SecretUnreadable
    from memberhub.webhooks.models import WebhookEndpoint

    async def sealed(db: Database) -> list[str]:
        async with db.transaction(read_only=True) as session:
            found = [
                await session.scalar(select(Integration.credentials).limit(1)),
                await session.scalar(select(WebhookEndpoint.secret).limit(1)),
            ]
        return [value for value in found if value]

    box = SecretBox(settings.resolved_secret_key)
    for stored in _run(sealed):
        try:
            box.decrypt(stored)
        except SecretUnreadable:
            typer.echo(
                "error: the secret key cannot read the secrets stored in this database: start "
                "with the key they were sealed with (after `memberhub secrets rotate`, the new "
                "one)",
                err=True,
            )
            raise typer.Exit(code=1) from None


def _run(work: Callable[[Database], Awaitable[T]], *, seal_audit: bool = False) -> T:
    """Run one unit of work against the configured database; errors exit non-zero.

    `seal_audit`: the database's sessions carry the audit chain's key, derived from the
    secret (which must then be there), so that its sequencing passes link audit entries and
    the chain can be checked. Without it, entries are left for the service to link.
    """
    settings = _settings()
    session_info = None
    if seal_audit:
        from memberhub.audit.chain import ChainKey
        from memberhub.audit.chain import session_info as chain_session_info

        _require_secret_key(settings)
        session_info = chain_session_info(ChainKey(settings.resolved_secret_key))

    ProcessCache.configure(settings.cache_ttl_seconds, settings.data_dir / STAMP_FILE)

    async def main() -> T:
        db = Database(settings.resolved_database_url, pool_size=2, session_info=session_info)
        try:
            done = await work(db)
        finally:
            await db.dispose()
        # What the command changed (a key revoked, a program setting) may sit in the caches
        # of the processes of a `serve` sharing DATA_DIR, whatever this process caches
        # itself: moving the stamp makes them read it again at once.
        ProcessCache.touch_stamp()
        return done

    try:
        return asyncio.run(main())
    except MemberhubError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(code=1) from exc


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Do not run the embedded worker.")
    ] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            "--workers",
            min=0,
            max=64,
            help="API processes (default SERVE_PROCESSES; 0: one per CPU core, one on SQLite).",
        ),
    ] = None,
    upgrade_first: Annotated[
        bool,
        typer.Option("--upgrade", help="Apply the pending migrations first, as `db upgrade` does."),
    ] = False,
) -> None:
    """Serve the API (and, unless --no-worker, the worker in one of its processes). It
    refuses a database without this version's migrations unless --upgrade applies them."""
    import uvicorn

    from memberhub.kit.logging import configure_logging
    from memberhub.ops.metrics import multiprocess_directory
    from memberhub.ops.serving import SERVE_WORKER_ENV, serve_balanced

    settings = _settings()
    _require_listenable(host, port)
    _require_secret_key(settings)
    _require_schema(settings, upgrade_first=upgrade_first, can_upgrade=True)
    _require_readable_secrets(settings)
    count = settings.serve_processes if processes is None else processes
    if count == 0:
        # SQLite takes one writer at a time: processes would only wait on each other's locks.
        count = 1 if settings.is_sqlite else os.cpu_count() or 1
    options = {"host": host, "port": port, "log_level": "warning", "access_log": False}
    worker_note = "no embedded worker" if no_worker else "embedded worker"
    database = "SQLite" if settings.is_sqlite else "PostgreSQL"
    typer.echo(
        f"memberhub {__version__} listening on http://{host}:{port} "
        f"({count} process{'es' if count > 1 else ''}, {worker_note}, {database})"
    )
    if count == 1:
        # The directory first: it is emptied of an earlier run's files, and the app's
        # metrics make theirs.
        with multiprocess_directory(processes=1):
            with long_lived():
                from memberhub.app import create_app

                configure_error_tracking(settings)
                application = create_app(settings, embedded_worker=not no_worker)
            uvicorn.run(application, **options)  # type: ignore[arg-type]
        return
    # Each process builds its app from the environment, as this one read it (this one
    # only hands out connections: it never imports the application).
    settings.ensure_data_dir()
    configure_logging(settings.log_level, json=settings.log_json)
    os.environ[SERVE_WORKER_ENV] = "0" if no_worker else "1"
    # Every process's metrics in one directory, so that any of them reports them all.
    with multiprocess_directory(processes=count):
        # Connections handed out evenly by this process (see memberhub.ops.serving).
        exit_code = serve_balanced(
            {"app": "memberhub.app:serve_app", "factory": True, **options}, count
        )
    if exit_code:
        raise typer.Exit(exit_code)


def _require_listenable(host: str, port: int) -> None:
    """Bind the address once, as the server will (uvicorn's way: IPv6 for a host with a
    colon, else IPv4, address reuse on), so that one in use or not this machine's is one
    line and exit 1, before anything starts or says it is listening."""
    import socket

    ipv6 = ":" in host
    try:
        with socket.socket(
            socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        ) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if ipv6:
                # IPv6 alone, as asyncio listens: an IPv4 listener on the port is no clash.
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        shown = f"[{host}]:{port}" if ipv6 else f"{host}:{port}"
        typer.echo(f"error: cannot listen on {shown}: {reason}", err=True)
        raise typer.Exit(code=1) from None


@app.command()
def worker(
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve this worker's Prometheus metrics on this port (127.0.0.1).",
        ),
    ] = None,
) -> None:
    """Run the worker: scheduled jobs and webhook deliveries (on a database with this
    version's migrations)."""
    with long_lived():
        from prometheus_client import start_http_server

        from memberhub.kit.logging import configure_logging
        from memberhub.ops.metrics import Metrics
        from memberhub.ops.tracing import start_tracing
        from memberhub.worker.runner import Worker

    settings = _settings()
    _require_secret_key(settings)
    _require_schema(settings)
    _require_readable_secrets(settings)
    configure_logging(settings.log_level, json=settings.log_json)
    configure_error_tracking(settings)
    tracing = start_tracing(settings)

    async def work(db: Database) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        metrics = Metrics()
        metrics.watch_pools(db)
        if metrics_port is not None:
            start_http_server(metrics_port, addr="127.0.0.1", registry=metrics.exposed)
        jobs = Worker(
            db,
            interval_seconds=settings.worker_interval_seconds,
            settings=settings,
            metrics=metrics,
            tracing=tracing,
        )
        try:
            await asyncio.gather(jobs.run_forever(stop), metrics.sample_pools_until(stop))
        finally:
            metrics.close()

    async def traced_work(db: Database) -> None:
        """`work`, its statements and outbound calls traced; the spans still waiting are
        exported on the way out."""
        assert tracing is not None
        tracing.trace_database(db)
        try:
            await work(db)
        finally:
            await tracing.aclose()

    _run(work if tracing is None else traced_work, seal_audit=True)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest), saying which were applied."""
    _apply_migrations(_settings(), revision)


def _apply_migrations(
    settings: Settings, revision: str = "head", *, state: SchemaState | None = None
) -> None:
    """`db upgrade`; `state`: the schema's, when the caller has just read it."""
    state = state or schema_state(settings.resolved_database_url)
    if state.unknown:
        typer.echo(
            f"nothing to apply: the database is at revision {', '.join(state.unknown)}, "
            f"newer than this version's {state.newest} (a later version migrated it)"
        )
        return
    applied = upgrade(settings.resolved_database_url, revision)
    for applied_revision, description in applied:
        typer.echo(f"applied {applied_revision}: {description}")
    if not applied:
        typer.echo("nothing to apply")
    at = current(settings.resolved_database_url)
    typer.echo(f"database is at {', '.join(at) or 'no revision'}")
    from memberhub.audit.chain import KEYED_CHAIN_REVISION

    # Only in the run that keys the chain are unkeyed entries the previous version's: later,
    # an entry hashed without the key may be anyone's rewrite (whoever can write to the
    # database can compute such a hash), so sealing it is the operator's call.
    if any(revision == KEYED_CHAIN_REVISION for revision, _ in applied):
        _seal_unkeyed_audit_entries()
    elif any(revision >= KEYED_CHAIN_REVISION for revision in at):
        _warn_of_unkeyed_audit_entries()


def _count_unkeyed_audit_entries() -> int:
    from memberhub.audit.repository import AuditRepository

    async def count(db: Database) -> int:
        async with db.transaction(read_only=True) as session:
            return await AuditRepository(session).count_unkeyed()

    return _run(count)


def _warn_of_unkeyed_audit_entries() -> None:
    unkeyed = _count_unkeyed_audit_entries()
    if unkeyed:
        typer.echo(
            f"audit log: {unkeyed} entries are hashed without the key and not re-sealed: "
            "`memberhub audit verify` names them. If they are the ones the upgrade to the "
            "keyed chain could not seal, seal them with `memberhub audit reseal "
            "--expect-head H` (H: the head kept from before that upgrade)."
        )


def _seal_unkeyed_audit_entries() -> None:
    """In the run that keys the audit chain: entries hashed the old way (without the key)
    are checked that way and, if the whole chain checks, re-sealed with the key."""
    unkeyed = _count_unkeyed_audit_entries()
    if not unkeyed:
        return
    typer.echo(
        f"audit log: {unkeyed} entries were hashed without a key; checking the chain and "
        "re-sealing it with the key derived from SECRET_KEY"
    )
    _reseal_audit_chain(expect_head=None, previous_secrets=())


@db_app.command("current")
def db_current() -> None:
    """The revision the database is at, and the newest this version ships."""
    settings = _settings()
    state = schema_state(settings.resolved_database_url)
    at = ", ".join(state.at) or "no revision (never migrated)"
    typer.echo(f"database: {at}")
    note = (
        "  (the database is newer: a later version migrated it)"
        if state.unknown
        else "  (run `memberhub db upgrade`)"
        if at != state.newest
        else ""
    )
    typer.echo(f"newest:   {state.newest}{note}")


@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="What the key is for.")],
    role: Annotated[Role, typer.Option(help="The key's role.")],
    organisation: Annotated[
        str | None, typer.Option(help="Limit the key to this organisation (org_…).")
    ] = None,
    scope: Annotated[
        list[str] | None, typer.Option(help="Narrow the role's scopes (repeatable).")
    ] = None,
    rate_limit: Annotated[
        str | None,
        typer.Option(help="This key's own limit, e.g. '100/minute' (default: RATE_LIMIT)."),
    ] = None,
) -> None:
    """Create a key. The key is printed once, alone on the last line, and never again."""
    from memberhub.auth.service import create_api_key

    async def work(db: Database) -> tuple[str, str]:
        async with db.transaction() as session:
            issued = await create_api_key(
                session,
                CLI_ACTOR,
                name=name,
                role=role,
                scopes=scope or None,
                organisation_public_id=organisation,
                rate_limit=rate_limit,
            )
            return issued.api_key.public_id, issued.secret

    public_id, secret = _run(work)
    typer.echo(f"created {public_id} ({role.value}); store the key now, it is not shown again:")
    typer.echo(secret)


@apikey_app.command("list")
def apikey_list() -> None:
    """List keys (never their secrets)."""
    from memberhub.auth.repository import ApiKeyRepository

    async def work(db: Database) -> list[str]:
        async with db.transaction(read_only=True) as session:
            keys = await ApiKeyRepository(session).list_all()
            return [
                f"{k.public_id}\t{k.prefix}…\t{k.role}\t{k.name}\t"
                f"{'revoked' if k.revoked_at else 'active'}\t{k.created_at:%Y-%m-%d}"
                for k in keys
            ]

    for line in _run(work):
        typer.echo(line)


@apikey_app.command("revoke")
def apikey_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")]) -> None:
    """Revoke a key; requests with it get 401 from now on."""
    from memberhub.auth.service import revoke_api_key

    async def work(db: Database) -> None:
        async with db.transaction() as session:
            await revoke_api_key(session, CLI_ACTOR, key_id)

    _run(work)
    typer.echo(f"revoked {key_id}")


@apikey_app.command("ensure-admin")
def apikey_ensure_admin() -> None:
    """Create an admin key if none is active, printing it; otherwise say so."""
    from memberhub.auth.service import ensure_admin_key

    async def work(db: Database) -> str | None:
        async with db.transaction() as session:
            issued = await ensure_admin_key(session, CLI_ACTOR)
            return issued.secret if issued else None

    secret = _run(work)
    if secret is None:
        typer.echo("an admin API key already exists (memberhub apikey list)")
        return
    typer.echo("created an admin API key; store it now, it is not shown again:")
    typer.echo(secret)


@staff_app.command("create")
def staff_create(
    email: Annotated[str, typer.Option(help="The person's email; they sign in with it.")],
    role: Annotated[
        str, typer.Option(help="admin, manager or support_agent (as an API key's role).")
    ],
    name: Annotated[
        str | None, typer.Option(help="The person's name (default: from email).")
    ] = None,
    organisation: Annotated[
        str | None, typer.Option(help="Limit the account to this organisation (org_…).")
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option(help="Read the password from this file's first line (else one is made)."),
    ] = None,
    prompt_password: Annotated[
        bool, typer.Option("--prompt-password", help="Ask for the password at the terminal.")
    ] = False,
) -> None:
    """Create a staff account. Without --password-file or --prompt-password a password is
    generated and printed once, alone on the last line."""
    from memberhub.auth.principal import Principal
    from memberhub.staff.service import create_staff

    password = None
    if password_file is not None:
        try:
            password = password_file.read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise typer.BadParameter(
                f"cannot read a password from {password_file}", param_hint="--password-file"
            ) from exc
    elif prompt_password:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)

    async def work(db: Database) -> tuple[str, str | None]:
        async with db.transaction() as session:
            created = await create_staff(
                session,
                Principal.system(CLI_ACTOR),
                email=email,
                name=name or email.partition("@")[0] or email,
                role=role,
                organisation_public_id=organisation,
                password=password,
            )
            return created.staff.public_id, created.one_time_password

    public_id, one_time = _run(work)
    typer.echo(f"created {public_id} ({role}); sign in at /console/sign-in as {email}")
    if one_time is not None:
        typer.echo("its password, shown only now (change it on the account page):")
        typer.echo(one_time)


def _parse_head(text: str | None) -> ChainHead | None:
    from memberhub.audit.chain import ChainHead

    if text is None:
        return None
    try:
        return ChainHead.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expect-head") from exc


ExpectHead = Annotated[
    str | None,
    typer.Option(
        help="A head kept from `memberhub audit head` or an earlier verify (POSITION:HASH): "
        "fail unless the chain still has that hash at that position."
    ),
]


@audit_app.command("verify")
def audit_verify(expect_head: ExpectHead = None) -> None:
    """Check the audit log's chain and name every entry that was altered, re-hashed or
    removed (exit 1 if any); print the head checked, to keep elsewhere."""
    from memberhub.audit.service import ChainVerdict, verify_chain
    from memberhub.events.sequencer import run_passes

    expected = _parse_head(expect_head)

    async def work(db: Database) -> ChainVerdict:
        # Link what has committed but not been chained yet, then check the whole chain.
        await run_passes(db)
        async with db.transaction(read_only=True) as session:
            return await verify_chain(session, expect_head=expected)

    verdict = _run(work, seal_audit=True)
    if not verdict.intact:
        for problem in verdict.problems:
            typer.echo(f"TAMPERED {problem}")
        typer.echo(
            f"audit log TAMPERED: {len(verdict.problems)} problem(s) in {verdict.checked} "
            "entries checked"
        )
        raise typer.Exit(code=1)
    also = f", and the expected head {expected} is in it" if expected is not None else ""
    typer.echo(f"audit log intact: {verdict.checked} entries verified{also}")
    typer.echo(f"head: {verdict.head}")


@audit_app.command("head")
def audit_head() -> None:
    """Print the chain's newest entry as POSITION:HASH, to keep where the database's users
    cannot write; `audit verify --expect-head` then shows the chain still leads to it."""
    from memberhub.audit.service import chain_head
    from memberhub.events.sequencer import run_passes

    async def work(db: Database) -> ChainHead:
        await run_passes(db)
        async with db.transaction(read_only=True) as session:
            return await chain_head(session)

    typer.echo(str(_run(work, seal_audit=True)))


@audit_app.command("reseal")
def audit_reseal(
    expect_head: ExpectHead = None,
    previous_key_file: Annotated[
        list[Path] | None,
        typer.Option(
            help="A previous master secret (a file holding it): entries sealed under it, by a "
            "process still running with it after `secrets rotate`, are checked with it and "
            "re-sealed (repeatable)."
        ),
    ] = None,
) -> None:
    """Check the whole chain and, if every entry checks, seal it with the key derived from
    SECRET_KEY: entries hashed before the chain was keyed (`db upgrade` does this when it
    adds the seal) or sealed under a previous secret. Trusts their unkeyed hashes: pass the
    head kept before the upgrade as --expect-head if you have it."""
    secrets_given = tuple(path.read_text().strip() for path in previous_key_file or ())
    _reseal_audit_chain(expect_head=_parse_head(expect_head), previous_secrets=secrets_given)


def _reseal_audit_chain(
    *, expect_head: ChainHead | None, previous_secrets: tuple[str, ...]
) -> None:
    from memberhub.audit.chain import ChainKey, session_key
    from memberhub.audit.service import ResealReport, reseal_chain

    previous = tuple(ChainKey(secret) for secret in previous_secrets)

    async def work(db: Database) -> ResealReport:
        async with db.transaction() as session:
            key = session_key(session)
            assert key is not None
            return await reseal_chain(
                session,
                key,
                previous_keys=previous,
                accept_unkeyed=True,
                expect_head=expect_head,
            )

    report = _run(work, seal_audit=True)
    typer.echo(f"audit log re-sealed: {report.resealed} entries; head was {report.old_head}")
    typer.echo(f"head: {report.new_head}")


@secrets_app.command("rotate")
def secrets_rotate(
    new_key: Annotated[
        str | None,
        typer.Option(
            help="The new master secret (at least 32 characters). Prefer --new-key-file or "
            "MEMBERHUB_NEW_SECRET_KEY: a command line is visible to other users.",
            envvar="MEMBERHUB_NEW_SECRET_KEY",
        ),
    ] = None,
    new_key_file: Annotated[
        Path | None, typer.Option(help="Read the new master secret from this file.")
    ] = None,
) -> None:
    """Re-encrypt every stored secret (integration credentials, webhook signing secrets,
    stored responses) under a new master secret and re-seal the audit chain with the key
    derived from it, all in one transaction.

    Afterwards set MEMBERHUB_SECRET_KEY to the new secret (when the secret is kept in the
    data directory's secret_key file, that file is replaced) and restart the service and
    its workers: the old secret no longer decrypts anything.
    """
    from memberhub.audit.chain import ChainKey
    from memberhub.kit.crypto import SecretBox
    from memberhub.kit.rotation import RotationReport, rotate_secrets

    if new_key_file is not None:
        new_key = new_key_file.read_text().strip()
    if not new_key:
        typer.echo("error: give the new secret with --new-key or --new-key-file", err=True)
        raise typer.Exit(code=2)
    if len(new_key) < MIN_SECRET_LENGTH:
        typer.echo(
            f"error: the new secret must be at least {MIN_SECRET_LENGTH} characters", err=True
        )
        raise typer.Exit(code=2)
    settings = _settings()
    old_box = SecretBox(settings.resolved_secret_key)
    new_box = SecretBox(new_key)
    audit_chain = (ChainKey(settings.resolved_secret_key), ChainKey(new_key))

    async def work(db: Database) -> RotationReport:
        async with db.transaction() as session:
            return await rotate_secrets(session, old_box, new_box, audit_chain=audit_chain)

    key_file = settings.data_dir / "secret_key"
    staged = None
    if not settings.secret_key and key_file.exists():
        # Written before the database moves to the new key, so that a full disk stops the
        # rotation rather than leaving data no key file can read.
        staged = key_file.with_suffix(".new")
        staged.unlink(missing_ok=True)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_key)
    try:
        report = _run(work)
    except BaseException:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise
    for column, count in report.counts.items():
        typer.echo(f"{column}: {count} re-encrypted")
    typer.echo(f"audit_log: {report.audit_entries_resealed} entries re-sealed")
    if staged is not None:
        staged.replace(key_file)
        typer.echo(f"the new secret replaced {key_file}; restart the service and workers")
    else:
        typer.echo("set MEMBERHUB_SECRET_KEY to the new secret and restart the service and workers")


PassphraseFile = Annotated[
    Path | None,
    typer.Option(
        help="Read the passphrase from this file (first line). Otherwise it comes from "
        "MEMBERHUB_BACKUP_PASSPHRASE, or is asked for when a terminal is attached."
    ),
]


def _passphrase(passphrase_file: Path | None, *, confirm: bool) -> str | None:
    """The passphrase from a file, the environment or the terminal; None when there is
    none to be had."""
    if passphrase_file is not None:
        try:
            return passphrase_file.read_text().splitlines()[0]
        except (OSError, IndexError):
            typer.echo(f"error: cannot read a passphrase from {passphrase_file}", err=True)
            raise typer.Exit(code=2) from None
    from_environment = _settings().backup_passphrase
    if from_environment:
        return from_environment.get_secret_value()
    if os.isatty(0):
        return str(typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm))
    return None


def _sealed_secret(settings: Settings, passphrase_file: Path | None) -> bytes:
    from memberhub.kit.sealing import SealError, seal_secret

    passphrase = _passphrase(passphrase_file, confirm=True)
    if passphrase is None:
        typer.echo(
            "error: the secret key is sealed with a passphrase: give --passphrase-file or "
            "MEMBERHUB_BACKUP_PASSPHRASE (or --without-secret-key, keeping the secret "
            "some other way)",
            err=True,
        )
        raise typer.Exit(code=2)
    try:
        return seal_secret(settings.resolved_secret_key, passphrase)
    except SealError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


@secrets_app.command("export")
def secrets_export(
    file: Annotated[Path, typer.Argument(help="Where to write the sealed secret.")],
    passphrase_file: PassphraseFile = None,
    force: Annotated[bool, typer.Option(help="Overwrite FILE if it exists.")] = False,
) -> None:
    """Write the master secret sealed with a passphrase (scrypt and AES-256-GCM), to keep
    apart from the database's backups. `memberhub secrets import` puts it back."""
    settings = _settings()
    _require_secret_key(settings)
    if file.exists() and not force:
        typer.echo(f"error: {file} exists; choose another file or pass --force", err=True)
        raise typer.Exit(code=1)
    sealed = _sealed_secret(settings, passphrase_file)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(sealed)
    typer.echo(f"sealed secret written to {file}")


@secrets_app.command("import")
def secrets_import(
    file: Annotated[Path, typer.Argument(help="A file written by `memberhub secrets export`.")],
    passphrase_file: PassphraseFile = None,
    force: Annotated[
        bool, typer.Option(help="Replace a different secret already in the data directory.")
    ] = False,
) -> None:
    """Open a sealed secret and keep it as the data directory's secret_key file."""
    from memberhub.kit.sealing import SealError, open_secret

    settings = _settings()
    passphrase = _passphrase(passphrase_file, confirm=False)
    if passphrase is None:
        typer.echo("error: give the passphrase (--passphrase-file)", err=True)
        raise typer.Exit(code=2)
    try:
        secret = open_secret(file.read_bytes(), passphrase)
    except OSError as exc:
        typer.echo(f"error: cannot read {file}: {exc.strerror}", err=True)
        raise typer.Exit(code=1) from None
    except SealError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    key_file = settings.data_dir / "secret_key"
    if key_file.exists() and key_file.read_text().strip() != secret and not force:
        typer.echo(
            f"error: {key_file} holds a different secret; pass --force to replace it", err=True
        )
        raise typer.Exit(code=1)
    settings.ensure_data_dir()
    staged = key_file.with_suffix(".imported")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret)
    staged.replace(key_file)
    typer.echo(f"secret written to {key_file}")
    if settings.secret_key and settings.secret_key != secret:
        typer.echo("note: MEMBERHUB_SECRET_KEY is set and takes precedence over that file")


@backup_app.command("create")
def backup_create(
    file: Annotated[Path, typer.Argument(help="The backup file to write (.tar.gz).")],
    passphrase_file: PassphraseFile = None,
    without_secret_key: Annotated[
        bool,
        typer.Option(
            help="Leave the master secret out (keep it with `memberhub secrets export`); "
            "the backup alone then cannot decrypt stored credentials."
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="Overwrite FILE if it exists.")] = False,
) -> None:
    """A consistent copy of the running installation's database (SQLite's backup API, or
    pg_dump) and, sealed with a passphrase, its master secret, in one file."""
    from memberhub.ops.backup import BackupError, create_backup

    settings = _settings()
    _require_secret_key(settings)
    sealed = None if without_secret_key else _sealed_secret(settings, passphrase_file)
    url = settings.resolved_database_url
    revision = None if settings.is_sqlite else ", ".join(current(url)) or None
    try:
        manifest = create_backup(
            url,
            settings.resolved_secret_key,
            file,
            sealed_secret=sealed,
            schema_revision=revision,
            overwrite=force,
        )
    except BackupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(
        f"backup of the {manifest.database} database at revision {manifest.schema_revision} "
        f"written to {file} ({file.stat().st_size} bytes)"
        + ("" if manifest.has_secret_key else "; the secret key is NOT in it")
    )


@export_app.command("duckdb")
def export_duckdb(
    file: Annotated[Path, typer.Argument(help="The DuckDB database to create or refresh.")],
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="A storage integration's id (int_…), whose files are downloaded beside FILE "
            "into FILE.files/, or a local directory holding the exports.",
        ),
    ],
) -> None:
    """Build a local analytics database from the exports: a view per exported table over
    the files its manifests list, and KPI views (points liability, monthly points earned,
    redeemed and expired, active members, members by status)."""
    import re

    import duckdb

    from memberhub.exports import warehouse

    try:
        if re.fullmatch(r"int_[0-9a-z]{1,40}", source):
            root = file.with_name(file.name + ".files")

            async def gather(db: Database) -> dict[str, warehouse.TableFiles]:
                return await warehouse.from_integration(db, _settings(), source, root)

            tables = _run(gather)
        else:
            root = Path(source)
            if not root.is_dir():
                typer.echo(
                    f"error: {source} is neither an integration id nor a directory", err=True
                )
                raise typer.Exit(code=1)
            tables = warehouse.table_files(warehouse.local_manifests(root))
        if not tables:
            typer.echo(f"error: no export manifests found in {source}", err=True)
            raise typer.Exit(code=1)
        created = warehouse.build(file, tables, root.resolve())
    except (warehouse.ManifestError, MemberhubError, duckdb.Error) as exc:
        message = exc.message if isinstance(exc, MemberhubError) else str(exc)
        typer.echo(f"error: {message.strip().splitlines()[0]}", err=True)
        raise typer.Exit(code=1) from None
    for entry in sorted(tables.values(), key=lambda t: t.table):
        typer.echo(f"{entry.table}: {entry.rows} rows in {len(entry.keys)} files")
    typer.echo(f"{file}: views {', '.join(created)}")


@backup_app.command("restore")
def backup_restore(
    file: Annotated[Path, typer.Argument(help="A file written by `memberhub backup create`.")],
    passphrase_file: PassphraseFile = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace a database that holds data, or a different secret key (stop the "
            "service first)."
        ),
    ] = False,
) -> None:
    """Restore a backup into the configured database (it must be empty unless --force) and
    put its secret key in the data directory, so stored credentials and the audit chain
    read as before. Then run `memberhub db upgrade` if the backup is older than this
    version, and `memberhub audit verify`."""
    from memberhub.kit.sealing import SealError
    from memberhub.ops.backup import (
        BackupError,
        postgres_holds_data_query,
        postgres_other_sessions_query,
        read_manifest,
        restore_backup,
    )

    settings = _settings()
    url = settings.resolved_database_url
    try:
        manifest = read_manifest(file)
    except BackupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    if manifest.schema_revision is not None and manifest.schema_revision not in shipped():
        # Its schema is one this version cannot read or migrate back.
        typer.echo(
            f"error: the backup was made by a newer version of memberhub (schema revision "
            f"{manifest.schema_revision}; this version's newest is {head()}): restore it with "
            "that version or a later one",
            err=True,
        )
        raise typer.Exit(code=1)
    passphrase = None
    if manifest.has_secret_key and settings.secret_key is None:
        passphrase = _passphrase(passphrase_file, confirm=False)
    holds_data = False
    other_sessions: list[str] = []
    if not settings.is_sqlite:
        from sqlalchemy import text

        async def look(db: Database) -> tuple[int, list[str]]:
            async with db.transaction(read_only=True) as session:
                tables = (await session.execute(text(postgres_holds_data_query()))).scalar_one()
                sessions = await session.scalars(text(postgres_other_sessions_query()))
                return int(tables), list(sessions)

        tables, other_sessions = _run(look)
        holds_data = tables > 0
    try:
        report = restore_backup(
            file,
            url,
            data_dir=settings.data_dir,
            configured_secret=settings.secret_key,
            passphrase=passphrase,
            postgres_holds_data=holds_data,
            postgres_other_sessions=other_sessions,
            force=force,
            head_revision=head(),
        )
    except (BackupError, SealError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(
        f"restored the {report.manifest.database} backup of {report.manifest.created_at} "
        f"(revision {report.manifest.schema_revision})"
    )
    if report.secret_key_written is not None:
        typer.echo(f"secret key written to {report.secret_key_written}")
    if report.needs_upgrade:
        typer.echo("the backup is older than this version: run `memberhub db upgrade`")
    typer.echo("check it with `memberhub audit verify`")


@app.command()
def demo(
    members: Annotated[
        int, typer.Option(min=0, max=1_000_000, help="How many members to create.")
    ] = 200,
) -> None:
    """Load a demo data set: an HQ with two chapters, three plans and members in all statuses."""
    from memberhub.demo import load_demo

    async def work(db: Database) -> str:
        async with db.transaction() as session:
            return await load_demo(session, CLI_ACTOR, members=members)

    typer.echo(_run(work))
