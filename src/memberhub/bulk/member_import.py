"""Member imports: a file of members becomes a bulk job that creates or updates them.

The upload (CSV with a header row, or JSON Lines) is read as bulk awards are: its structure
is checked in the request (a header naming known fields, after the column mapping; one
object per line), its rows stored as chunks, and the worker applies one chunk per
transaction. Each row runs in its own savepoint, so a row that fails (a bad email, an
unknown plan, a plan the member cannot join) writes nothing while the rest of its chunk is
kept, and the row's report says why.

A row matches an existing member by email within its organisation, or by an external id
(`SYSTEM:ID`); a matched member is updated with the fields that differ, and a row that
differs in nothing is `unchanged`. The other changes go through the same services as the
API's, with their events and audit entries: joining the plan when the member holds none,
and an opening points balance awarded once per member (reference `opening-balance:<member>`)
as one audited ledger operation. So running the same file again changes nothing.

A dry run applies each chunk exactly so and rolls it back: the report says what would be
created, updated or refused. Each of its rows keeps the member it names (normalised email,
external id); a later chunk first replays, inside its own rolled-back trial, the earlier
rows naming the same members (and, transitively, those naming the members those name), so
a member met in several chunks is reported as the import would treat it: created once, then
updated or unchanged.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic.networks import validate_email
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.principal import Principal
from memberhub.auth.roles import Role, Scope
from memberhub.bulk.models import BulkJob, RowAction, RowOutcome
from memberhub.bulk.repository import BulkRepository
from memberhub.bulk.upload import (
    CSV_MEDIA_TYPE,
    CsvUpload,
    UnsupportedMediaType,
    Upload,
    _malformed,
    check_utf8,
    repeated_key,
    report_text,
)
from memberhub.kit.errors import Conflict, MemberhubError, ValidationFailed
from memberhub.kit.http import DuplicateKeys, unique_keys
from memberhub.kit.types import Input
from memberhub.members import service as members
from memberhub.members.consent import ConsentSource
from memberhub.members.models import Member, MemberStatus
from memberhub.members.repository import normalize_email
from memberhub.members.schemas import MemberCreate, MemberPatch
from memberhub.memberships import service as memberships
from memberhub.points import service as points
from memberhub.points.models import TxnType
from memberhub.points.repository import PointsRepository
from memberhub.points.schemas import MAX_POINTS

JSONL_MEDIA_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
MEMBER_IMPORTS_PATH = "/api/v1/imports/members"
CUSTOM_PREFIX = "custom."
PROFILE_FIELDS = ("email", "first_name", "last_name", "phone", "date_of_birth")
CONSENT_FIELDS = (
    "consent_email",
    "consent_sms",
    "consent_analytics",
    "consent_profiling",
    "consent_crm",
    "consent_marketing_email",
)
FIELDS = frozenset(
    {
        *PROFILE_FIELDS,
        *CONSENT_FIELDS,
        "organisation_id",
        "plan_id",
        "external_id",
        "opening_points",
    }
)
OPENING_BALANCE_REASON = "Opening balance (member import)"
# Statuses from which a member joins a plan; an active member keeps the plan it holds.
_ENDED = (MemberStatus.LAPSED, MemberStatus.CANCELLED)
_TRUE = frozenset({"true", "yes", "y", "1"})
_FALSE = frozenset({"false", "no", "n", "0"})
_POINTS = re.compile(r"[0-9]{1,13}")
_EXTERNAL_ID = re.compile(r"([a-z0-9][a-z0-9_-]{0,39}):(.+)")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,70}")


class ImportOptions(Input):
    """How an import's rows become members (kept with the job)."""

    match_by: Literal["email", "external_id"] = Field(
        default="email",
        description="`email`: a row updates the member with its email in its organisation. "
        "`external_id`: the member whose external id (the row's `external_id`, SYSTEM:ID) "
        "matches; its email may change.",
    )
    organisation_id: str | None = Field(
        default=None, max_length=45, description="For rows that give no organisation_id."
    )
    plan_id: str | None = Field(
        default=None, max_length=45, description="For rows that give no plan_id."
    )
    mapping: dict[str, str] = Field(
        default_factory=dict,
        max_length=100,
        description="The file's column (or JSON key) for each field it fills, as "
        '{"E-mail address": "email", "Given name": "first_name"}, case aside; unmapped '
        "columns keep their own names. A CSV file must have every column mapped.",
    )

    @field_validator("mapping")
    @classmethod
    def _targets_are_fields(cls, mapping: dict[str, str]) -> dict[str, str]:
        folded: set[str] = set()
        for source, target in mapping.items():
            if not source.strip() or len(source) > 200:
                raise ValueError("a mapped column name must be 1 to 200 characters")
            if _folded(source) in folded:
                raise ValueError(f"the column {source.strip()!r} is mapped twice (case aside)")
            folded.add(_folded(source))
            if not _is_field(target):
                raise ValueError(
                    f"{target!r} is not a field; the fields are {', '.join(sorted(FIELDS))} "
                    "and custom.<key>"
                )
        return mapping


def _is_field(name: str) -> bool:
    if name in FIELDS:
        return True
    return name.startswith(CUSTOM_PREFIX) and bool(_FIELD_NAME.fullmatch(name))


def _check_fields(names: list[str], line: int, *, header: bool) -> None:
    unknown = sorted(name for name in names if not _is_field(name))
    if unknown:
        raise _malformed(
            "unknown columns; map them to fields with `mapping`."
            if header
            else "unknown fields; map them to fields with `mapping`.",
            line,
            unknown_columns=unknown[:20],
            known_columns=sorted(FIELDS),
        )


def _folded(column: str) -> str:
    """A column's name as the mapping matches it: spaces around and case aside."""
    return column.strip().casefold()


def _mapped(name: str, mapping: dict[str, str]) -> str:
    """The field a column fills: by the mapping (`mapping` keyed by `_folded` names), else
    its own name, case aside (a custom field's key keeps its case: `custom.FavColour` fills
    the key `FavColour`, as the API would)."""
    stripped = name.strip()
    found = mapping.get(_folded(stripped))
    if found:
        return found
    if stripped.lower().startswith(CUSTOM_PREFIX):
        return CUSTOM_PREFIX + stripped[len(CUSTOM_PREFIX) :]
    return stripped.lower()


class MemberCsvUpload(CsvUpload):
    def __init__(self, file: IO[bytes], mapping: dict[str, str]) -> None:
        super().__init__(file)
        self.sources = mapping
        self.mapping = {_folded(source): target for source, target in mapping.items()}
        self.header: list[str] = []

    def _name_columns(self, header: list[str]) -> list[str]:
        self.header = header
        return [_mapped(name, self.mapping) for name in header]

    def _check_header(self, columns: list[str], line: int) -> None:
        present = {_folded(name) for name in self.header}
        absent = sorted(source for source in self.sources if _folded(source) not in present)
        if absent:
            # A misspelt mapping would otherwise leave its field empty in every row.
            raise _malformed(
                "the mapping names columns the header does not have.",
                line,
                missing_columns=absent[:20],
                columns=self.header[:20],
            )
        _check_fields(columns, line, header=True)
        duplicated = sorted({name for name in columns if columns.count(name) > 1})
        if duplicated:
            raise _malformed("repeated columns.", line, repeated_columns=duplicated)
        if "email" not in columns:
            raise _malformed("the header needs an email column.", line, columns=columns[:20])


class MemberJsonLinesUpload(Upload):
    """One JSON object per line; blank lines are skipped."""

    def __init__(self, file: IO[bytes], mapping: dict[str, str]) -> None:
        super().__init__()
        self.file = file
        self.mapping = {_folded(source): target for source, target in mapping.items()}

    def _parse(self) -> Iterator[dict[str, Any]]:
        self.file.seek(0)
        text = io.TextIOWrapper(self.file, encoding="utf-8-sig", newline="\n")
        try:
            for line_number, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                yield self._row(line, line_number)
        finally:
            text.detach()

    def _row(self, line: str, line_number: int) -> dict[str, Any]:
        try:
            value = json.loads(line, object_pairs_hook=unique_keys)
        except DuplicateKeys as exc:
            raise repeated_key(exc, line_number) from None
        except (ValueError, RecursionError) as exc:
            raise _malformed("not valid JSON.", line_number) from exc
        if not isinstance(value, dict):
            raise _malformed("a line must hold one JSON object.", line_number)
        row = {_mapped(str(key), self.mapping): item for key, item in value.items()}
        _check_fields(list(row), line_number, header=False)
        if len(row) != len(value):
            raise _malformed("two keys map to the same field.", line_number)
        if any(isinstance(item, dict | list) for item in row.values()):
            raise _malformed("a value is nested; give text, numbers or booleans.", line_number)
        return {name: item for name, item in row.items() if item is not None and item != ""}


def open_member_upload(media_type: str, file: IO[bytes], mapping: dict[str, str]) -> Upload:
    kind = media_type.split(";", 1)[0].strip().lower()
    if kind not in (CSV_MEDIA_TYPE, *JSONL_MEDIA_TYPES):
        raise UnsupportedMediaType(
            f"Send the members as {CSV_MEDIA_TYPE} or {JSONL_MEDIA_TYPES[0]} (JSON Lines).",
            details={"content_type": kind[:100] or None},
        )
    check_utf8(file)
    if kind == CSV_MEDIA_TYPE:
        return MemberCsvUpload(file, mapping)
    return MemberJsonLinesUpload(file, mapping)


# ---------------------------------------------------------------- one row


class RowRefused(ValidationFailed):
    code = "ROW_INVALID"


def _flag(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RowRefused(f"{field}: give true or false (or yes/no, 1/0), not {str(value)[:40]!r}.")


def _opening_points(value: Any) -> int:
    if isinstance(value, bool):
        raise RowRefused("opening_points: give a whole number of points.")
    text = str(value).strip()
    if isinstance(value, int) or _POINTS.fullmatch(text):
        number = int(text)
        if 0 <= number <= MAX_POINTS:
            return number
    raise RowRefused(f"opening_points: give a whole number from 0 to {MAX_POINTS}.")


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "row"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


class ImportRow:
    """A row's values, checked: the member's fields, its plan and opening balance."""

    def __init__(self, raw: dict[str, Any], options: ImportOptions) -> None:
        fields: dict[str, Any] = {
            name: str(raw[name]).strip() for name in PROFILE_FIELDS if name in raw
        }
        consent = {
            name.removeprefix("consent_"): _flag(raw[name], name)
            for name in CONSENT_FIELDS
            if name in raw
        }
        custom = {
            name.removeprefix(CUSTOM_PREFIX): raw[name]
            for name in raw
            if name.startswith(CUSTOM_PREFIX)
        }
        external = None
        if "external_id" in raw:
            match = _EXTERNAL_ID.fullmatch(str(raw["external_id"]).strip())
            if match is None:
                raise RowRefused("external_id: give SYSTEM:ID, such as crm:12345.")
            external = (match.group(1), match.group(2))
        elif options.match_by == "external_id":
            raise RowRefused("external_id: needed to match members by external id.")
        organisation = raw.get("organisation_id", options.organisation_id)
        try:
            self.create = MemberCreate.model_validate(
                {
                    **fields,
                    "organisation_id": str(organisation) if organisation is not None else None,
                    "consent": consent,
                    "custom_fields": custom,
                    "external_ids": {external[0]: external[1]} if external else {},
                }
            )
        except ValidationError as exc:
            raise RowRefused(_validation_message(exc)) from None
        self.consent_given = consent
        self.custom_given = custom
        self.external = external
        plan = raw.get("plan_id", options.plan_id)
        self.plan_id = str(plan).strip() if plan is not None else None
        self.opening_points = (
            _opening_points(raw["opening_points"]) if "opening_points" in raw else 0
        )


def _patch(member: Member, row: ImportRow) -> MemberPatch | None:
    """The changes the row makes to a matched member; None when it changes nothing."""
    changes: dict[str, Any] = {}
    given = row.create.model_dump(include=set(PROFILE_FIELDS), exclude_unset=True)
    for name, value in given.items():
        current = getattr(member, name)
        if value != current:
            changes[name] = value
    consent = {
        name: value
        for name, value in row.consent_given.items()
        if getattr(member, f"consent_{name}") != value
    }
    if consent:
        changes["consent"] = consent
    custom = {
        key: value
        for key, value in row.custom_given.items()
        if member.custom_fields.get(key) != value
    }
    if custom:
        changes["custom_fields"] = custom
    if row.external and member.external_ids.get(row.external[0]) != row.external[1]:
        changes["external_ids"] = {row.external[0]: row.external[1]}
    return MemberPatch.model_validate(changes) if changes else None


def _email_key(raw: object) -> str | None:
    """The email a row's cell names, as validation reads it (`Ana <ana@example.org>` is
    ana@example.org, accents composed) and members are looked up by; None if invalid."""
    try:
        return normalize_email(validate_email(str(raw))[1])
    except ValueError:
        return None


class MemberFinder:
    """Finds the member a row names, reading a chunk's emails in one query."""

    def __init__(self, session: AsyncSession, principal: Principal, options: ImportOptions):
        self.session = session
        self.principal = principal
        self.options = options
        self.by_email: dict[tuple[int | None, str], Member] = {}

    async def preload(self, rows: list[dict[str, Any]]) -> None:
        if self.options.match_by != "email":
            return
        emails = {key for raw in rows if raw.get("email") and (key := _email_key(raw["email"]))}
        if not emails:
            return
        query = select(Member).where(
            Member.email_normalized.in_(emails), Member.deleted_at.is_(None)
        )
        for member in await self.session.scalars(query):
            assert member.email_normalized is not None
            self.by_email[(member.organisation_id, member.email_normalized)] = member

    async def find(self, row: ImportRow, organisation_id: int | None) -> Member | None:
        if self.options.match_by == "external_id":
            assert row.external is not None
            system, value = row.external
            query = select(Member).where(
                Member.external_ids[system].as_string() == value, Member.deleted_at.is_(None)
            )
            visible = self.principal.visible_organisation_ids
            if visible is not None:
                # Members the key cannot see play no part: neither matched nor counted
                # (a "more than one" would tell that another organisation holds the id).
                query = query.where(Member.organisation_id.in_(visible))
            found = (await self.session.scalars(query.limit(2))).all()
            if len(found) > 1:
                raise Conflict(f"More than one member has the external id {system}:{value}.")
            member = found[0] if found else None
        else:
            member = self.by_email.get((organisation_id, normalize_email(row.create.email)))
        if member is not None and not self.principal.can_see_organisation(member.organisation_id):
            return None
        return member

    def remember(self, member: Member) -> None:
        if member.email_normalized is not None:
            self.by_email[(member.organisation_id, member.email_normalized)] = member


async def _organisation_id(
    session: AsyncSession, principal: Principal, row: ImportRow, cache: dict[str, int | None]
) -> int | None:
    reference = row.create.organisation_id
    if reference is None:
        # Where the member would be created: the key's own organisation, if it has one.
        return principal.organisation_id
    if reference not in cache:
        organisation = await members.resolve_organisation(session, principal, reference)
        cache[reference] = organisation.id if organisation else None
    return cache[reference]


async def apply_row(
    session: AsyncSession,
    principal: Principal,
    job: BulkJob,
    row_number: int,
    raw: dict[str, Any],
    finder: MemberFinder,
    organisations: dict[str, int | None],
    now: datetime,
) -> dict[str, Any]:
    """Apply one row in its own savepoint; the row's outcome record."""
    options = finder.options
    member: Member | None = None
    try:
        row = ImportRow(raw, options)
        async with session.begin_nested():
            organisation_id = await _organisation_id(session, principal, row, organisations)
            member = await finder.find(row, organisation_id)
            action = RowAction.UNCHANGED
            if member is None:
                member = await members.create_member(
                    session, principal, row.create, consent_source=ConsentSource.IMPORT
                )
                action = RowAction.CREATED
            else:
                patch = _patch(member, row)
                if patch is not None:
                    member = await members.update_member(
                        session,
                        principal,
                        member.public_id,
                        patch,
                        if_match=None,
                        consent_source=ConsentSource.IMPORT,
                    )
                    action = RowAction.UPDATED
            if row.plan_id is not None and await _join_plan(session, principal, member, row):
                action = action if action == RowAction.CREATED else RowAction.UPDATED
            transaction_id = None
            opening = row.opening_points or None
            if row.opening_points:
                reference = f"opening-balance:{member.public_id}"
                # Looked up by member, not by the reference's scope: a member moved to
                # another organisation since keeps the award it was given.
                given = await PointsRepository(session).member_transaction_by_reference(
                    member.id, TxnType.AWARD, reference
                )
                if given is not None:
                    # Awarded once, by an earlier import: never again, whatever this row says
                    # (the rest of the row applies all the same).
                    transaction_id, opening = given.public_id, given.points
                else:
                    result = await points.award_points(
                        session,
                        principal.actor,
                        member,
                        points=row.opening_points,
                        reason=OPENING_BALANCE_REASON,
                        reference_id=reference,
                        now=now,
                    )
                    transaction_id = result.transaction.public_id
                    if action == RowAction.UNCHANGED:
                        action = RowAction.UPDATED
        finder.remember(member)
    except (MemberhubError, DataError, IntegrityError) as exc:
        if member is not None and member in session and sa_inspect(member).expired_attributes:
            # The savepoint's rollback expired what the row changed; reload it for the
            # member's next row.
            await session.refresh(member)
        message = exc.message if isinstance(exc, MemberhubError) else "The row could not be stored."
        return _record(job, row_number, raw, outcome=RowOutcome.FAILED, error=message[:1000])
    return _record(
        job,
        row_number,
        raw,
        outcome=RowOutcome.DUPLICATE if action == RowAction.UNCHANGED else RowOutcome.APPLIED,
        action=action,
        member_id=member.public_id,
        points=opening,
        transaction_id=transaction_id,
    )


async def _join_plan(
    session: AsyncSession, principal: Principal, member: Member, row: ImportRow
) -> bool:
    """Join the row's plan if the member never held a membership; True when it joined.
    A membership that ended (cancelled, lapsed) is left ended: running an older file again
    must not undo a cancellation (renew or join through the membership operations)."""
    assert row.plan_id is not None
    plan = await memberships.get_plan(session, principal, row.plan_id)
    if member.status == MemberStatus.PENDING:
        await memberships.join(session, principal, member.public_id, plan.public_id, note=None)
        return True
    if member.plan_id == plan.id or member.status in _ENDED:
        return False
    raise Conflict(
        f"The member is {member.status} on another plan; change plans with "
        "the membership upgrade operation.",
        code="PLAN_HELD",
    )


def _record(
    job: BulkJob,
    row_number: int,
    raw: dict[str, Any],
    *,
    outcome: str,
    action: str | None = None,
    member_id: str | None = None,
    points: int | None = None,
    transaction_id: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    email = raw.get("email")
    match_email, match_external = (
        _match_keys(raw) if job.dry_run and outcome == RowOutcome.APPLIED else (None, None)
    )
    return {
        "job_id": job.id,
        "row_number": row_number,
        "outcome": outcome,
        "action": action,
        # As the row gave it, made storable (a lone surrogate or NUL would fail the chunk).
        "member_id": member_id or report_text(email, 320),
        "points": points,
        "reference_id": None,
        "transaction_id": transaction_id,
        "error": error,
        "match_email": match_email,
        "match_external": match_external,
    }


def _match_keys(raw: dict[str, Any]) -> tuple[str | None, str | None]:
    """The member a row names: its email as members are found by it (see `_email_key`) and
    its `SYSTEM:ID`, where given."""
    email, external = raw.get("email"), raw.get("external_id")
    email_key = _email_key(email) if email is not None else None
    email_key = email_key[:320] if email_key else None
    match = _EXTERNAL_ID.fullmatch(str(external).strip()) if external is not None else None
    return email_key, (f"{match.group(1)}:{match.group(2)}"[:300] if match else None)


async def _earlier_rows(
    session: AsyncSession, job: BulkJob, rows: list[tuple[int, dict[str, Any]]]
) -> list[tuple[int, dict[str, Any]]]:
    """For a dry run's chunk: the rows of earlier chunks that the import would have applied
    before it, changing something, and that name the members its rows name (by email or
    external id, and so on transitively), in file order. Rows that changed nothing are left
    out: a file naming one member on every row replays one row, not all before it."""
    if not rows:
        return []
    before = min(number for number, _ in rows)
    repo = BulkRepository(session)
    keys: dict[str, set[str]] = {"match_email": set(), "match_external": set()}
    for _, raw in rows:
        email, external = _match_keys(raw)
        keys["match_email"].update([email] if email else [])
        keys["match_external"].update([external] if external else [])
    asked: dict[str, set[str]] = {"match_email": set(), "match_external": set()}
    found: set[int] = set()
    while keys["match_email"] or keys["match_external"]:
        named: list[tuple[int, str | None, str | None]] = []
        for column, wanted in keys.items():
            asked[column] |= wanted
            if wanted:
                named += await repo.rows_naming(job.id, column, wanted, before=before)
        keys = {"match_email": set(), "match_external": set()}
        for number, email, external in named:
            if number in found:
                continue
            found.add(number)
            if email is not None and email not in asked["match_email"]:
                keys["match_email"].add(email)
            if external is not None and external not in asked["match_external"]:
                keys["match_external"].add(external)
    numbers = sorted(found)
    return list(zip(numbers, await repo.uploaded_rows(job.id, numbers), strict=True))


async def apply_chunk(
    session: AsyncSession,
    job: BulkJob,
    rows: list[tuple[int, dict[str, Any]]],
    visible: frozenset[int] | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Apply a chunk's rows (in a dry run, roll them all back); their outcome records.
    `visible`: the organisations the uploading key reaches."""
    principal = Principal(
        key_id=0,
        key_public_id=job.created_by,
        role=Role.ADMIN,
        scopes=frozenset(Scope),
        organisation_id=job.organisation_id,
        visible_organisation_ids=visible,
    )
    options = ImportOptions.model_validate(job.options or {})
    finder = MemberFinder(session, principal, options)
    organisations: dict[str, int | None] = {}
    if not job.dry_run:
        await finder.preload([raw for _, raw in rows])
        return [
            await apply_row(session, principal, job, number, raw, finder, organisations, now)
            for number, raw in rows
        ]
    earlier = await _earlier_rows(session, job, rows)
    await finder.preload([raw for _, raw in earlier + rows])
    trial = await session.begin_nested()
    try:
        # What the import would have done before this chunk to the members it names.
        for number, raw in earlier:
            await apply_row(session, principal, job, number, raw, finder, organisations, now)
        records = [
            await apply_row(session, principal, job, number, raw, finder, organisations, now)
            for number, raw in rows
        ]
    finally:
        await trial.rollback()
    return records


__all__ = [
    "JSONL_MEDIA_TYPES",
    "MEMBER_IMPORTS_PATH",
    "ImportOptions",
    "apply_chunk",
    "open_member_upload",
]
