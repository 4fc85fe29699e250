from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import diff, record_write
from memberhub.auth.principal import Principal
from memberhub.kit.db import Base
from memberhub.kit.errors import Conflict, Forbidden, NotFound
from memberhub.kit.ids import new_public_id
from memberhub.organisations.models import Organisation
from memberhub.organisations.repository import OrganisationRepository
from memberhub.organisations.schemas import OrganisationCreate, OrganisationOut, OrganisationPatch


def _snapshot(org: Organisation) -> dict[str, object]:
    return {"name": org.name, "slug": org.slug}


async def get_visible(session: AsyncSession, principal: Principal, public_id: str) -> Organisation:
    """The organisation, if it exists and the key may see it (404 otherwise, not 403)."""
    org = await OrganisationRepository(session).get_by_public_id(public_id)
    if org is None or not principal.can_see_organisation(org.id):
        raise NotFound(f"Organisation {public_id} does not exist.")
    return org


async def to_out(session: AsyncSession, orgs: Sequence[Organisation]) -> list[OrganisationOut]:
    parent_ids = {o.parent_id for o in orgs if o.parent_id is not None}
    parents = await OrganisationRepository(session).public_ids(parent_ids)
    return [
        OrganisationOut(
            id=o.public_id,
            name=o.name,
            slug=o.slug,
            kind=o.kind,
            parent_id=parents.get(o.parent_id) if o.parent_id is not None else None,
            created_at=o.created_at,
            updated_at=o.updated_at,
        )
        for o in orgs
    ]


async def create_organisation(
    session: AsyncSession, principal: Principal, payload: OrganisationCreate
) -> Organisation:
    repo = OrganisationRepository(session)
    parent = None
    if payload.parent_id is not None:
        parent = await get_visible(session, principal, payload.parent_id)
    elif principal.organisation_id is not None:
        raise Forbidden("A key bound to an organisation can only create chapters under it.")
    if await repo.get_by_slug(payload.slug) is not None:
        raise Conflict(f"The slug '{payload.slug}' is taken.", code="DUPLICATE_SLUG")
    org = Organisation(
        public_id=new_public_id("org"),
        name=payload.name,
        slug=payload.slug,
        parent_id=parent.id if parent else None,
        kind="chapter" if parent else "hq",
    )
    if session.get_bind().dialect.name == "sqlite":
        org.id = await _id_never_used(session)
    session.add(org)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="organisation.create",
        object_type="organisation",
        object_id=org.public_id,
        changes=diff({}, {**_snapshot(org), "parent_id": payload.parent_id}),
    )
    return org


# Columns that keep an organisation's id without a foreign key to it: the events and
# notifications of its members, and the scope of its reference ids. They outlive the
# organisation, so its id must never be another's.
ID_COPIES = (
    ("events", "organisation_id"),
    ("notifications", "organisation_id"),
    ("point_transactions", "reference_scope"),
    ("approval_requests", "reference_scope"),
    ("reward_claims", "reference_scope"),
)


async def _id_never_used(session: AsyncSession) -> int:
    """An id no organisation ever had. PostgreSQL's sequences never hand one out twice;
    SQLite gives the highest id again once that row is deleted, so a new organisation
    after the newest one was deleted would take over its events and reference ids."""
    import memberhub.models  # noqa: F401 - every table in the metadata

    tables = Base.metadata.tables
    columns = [tables["organisations"].c.id]
    columns += [tables[table].c[column] for table, column in ID_COPIES]
    highest = select(*(select(func.max(column)).scalar_subquery() for column in columns))
    used = (await session.execute(highest)).one()
    return 1 + max((int(value) for value in used if value is not None), default=0)


async def update_organisation(
    session: AsyncSession, principal: Principal, public_id: str, payload: OrganisationPatch
) -> Organisation:
    org = await get_visible(session, principal, public_id)
    before = _snapshot(org)
    changes = payload.model_dump(exclude_unset=True, exclude_none=True)
    if "slug" in changes and changes["slug"] != org.slug:
        existing = await OrganisationRepository(session).get_by_slug(changes["slug"])
        if existing is not None:
            raise Conflict(f"The slug '{changes['slug']}' is taken.", code="DUPLICATE_SLUG")
    for field, value in changes.items():
        setattr(org, field, value)
    await session.flush()
    changed = diff(before, _snapshot(org))
    if changed:
        record_write(
            session,
            principal.actor,
            action="organisation.update",
            object_type="organisation",
            object_id=org.public_id,
            changes=changed,
        )
    return org


async def delete_organisation(session: AsyncSession, principal: Principal, public_id: str) -> None:
    org = await get_visible(session, principal, public_id)
    if org.id == principal.organisation_id:
        raise Forbidden("A key cannot delete the organisation it is bound to.")
    repo = OrganisationRepository(session)
    if await repo.has_children(org.id):
        raise Conflict("Delete or move its chapters first.", code="ORGANISATION_HAS_CHAPTERS")
    usage = await repo.usage(org.id)
    held = {kind: count for kind, count in usage.items() if count}
    if held:
        raise Conflict(
            "The organisation still has "
            + ", ".join(f"{kind.replace('_', ' ')} ({count})" for kind, count in held.items())
            + ": move or delete them first.",
            code="ORGANISATION_IN_USE",
            details=usage,
        )
    # Erased members keep their rows (for ledgers and audit); they no longer belong anywhere.
    await repo.detach_erased_members(org.id)
    record_write(
        session,
        principal.actor,
        action="organisation.delete",
        object_type="organisation",
        object_id=org.public_id,
        changes=diff(_snapshot(org), {}),
    )
    await session.delete(org)
    await session.flush()
