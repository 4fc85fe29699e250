from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.auth import keys
from memberhub.auth.models import ApiKey
from memberhub.auth.principal import Principal
from memberhub.auth.repository import ApiKeyRepository
from memberhub.auth.roles import ROLE_SCOPES, Role, Scope
from memberhub.kit.actor import Actor
from memberhub.kit.cache import ProcessCache
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict, NotFound, Unauthorized, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.kit.limits import parse_rate_limit
from memberhub.kit.types import valid_name
from memberhub.organisations.models import Organisation
from memberhub.organisations.repository import OrganisationRepository


@dataclass(frozen=True)
class KeyRecord:
    """What authenticating a key needs from its row and its organisation's subtree."""

    key_id: int
    key_public_id: str
    key_hash: str
    role: Role
    scopes: frozenset[Scope]
    organisation_id: int | None
    visible_organisation_ids: frozenset[int] | None
    rate_limit: str | None
    revoked: bool


# Keys by lookup prefix, kept per process (`kit/cache.py`): a key revoked or changed here is
# refused at once; one revoked through another process within the cache TTL.
_KEY_CACHE: ProcessCache[str, KeyRecord | None] = ProcessCache(
    "api_keys", watches=(ApiKey, Organisation)
)


async def _key_record(session: AsyncSession, prefix: str) -> KeyRecord | None:
    api_key = await ApiKeyRepository(session).get_by_prefix(prefix)
    if api_key is None:
        return None
    visible = None
    if api_key.organisation_id is not None:
        visible = await OrganisationRepository(session).subtree_ids(api_key.organisation_id)
    return KeyRecord(
        key_id=api_key.id,
        key_public_id=api_key.public_id,
        key_hash=api_key.key_hash,
        role=Role(api_key.role),
        scopes=effective_scopes(api_key),
        organisation_id=api_key.organisation_id,
        visible_organisation_ids=visible,
        rate_limit=api_key.rate_limit,
        revoked=api_key.revoked_at is not None,
    )


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str


async def create_api_key(
    session: AsyncSession,
    actor: Actor,
    *,
    name: str,
    role: Role,
    scopes: Sequence[str] | None = None,
    organisation_public_id: str | None = None,
    rate_limit: str | None = None,
) -> IssuedKey:
    """Issue a key; the secret is returned here once and only its digest is kept."""
    name = valid_name(name)
    if rate_limit is not None and len(rate_limit) > 50:
        raise ValidationFailed(
            "rate_limit: at most 50 characters, like '100/minute'.",
            details={"field": "rate_limit"},
        )
    allowed = ROLE_SCOPES[role]
    if scopes is not None:
        unknown = sorted(set(scopes) - {s.value for s in Scope})
        if unknown:
            raise ValidationFailed(
                f"Unknown scopes: {', '.join(scope[:50] for scope in unknown[:10])}.",
                details={"unknown_scopes": unknown},
            )
        outside = sorted(set(scopes) - {s.value for s in allowed})
        if outside:
            raise ValidationFailed(
                f"The {role} role cannot hold these scopes: {', '.join(sorted(outside)[:10])}.",
                details={"scopes": outside},
            )
    if rate_limit is not None:
        try:
            parse_rate_limit(rate_limit)
        except ValueError as exc:
            raise ValidationFailed(
                f"'{rate_limit}' is not a rate limit of at least one request; write it like "
                "'100/minute'.",
                details={"field": "rate_limit"},
            ) from exc
    organisation_id = None
    if organisation_public_id is not None:
        organisation = await OrganisationRepository(session).get_by_public_id(
            organisation_public_id
        )
        if organisation is None:
            raise NotFound(f"Organisation {organisation_public_id} does not exist.")
        organisation_id = organisation.id
    secret = keys.generate_key()
    prefix = keys.lookup_prefix(secret)
    assert prefix is not None
    api_key = ApiKey(
        public_id=new_public_id("key"),
        name=name,
        prefix=prefix,
        key_hash=keys.digest(secret),
        role=role.value,
        scopes={"scopes": sorted(scopes) if scopes is not None else None},
        organisation_id=organisation_id,
        rate_limit=rate_limit,
    )
    session.add(api_key)
    await session.flush()
    record_write(
        session,
        actor,
        action="api_key.create",
        object_type="api_key",
        object_id=api_key.public_id,
        changes={
            "name": {"before": None, "after": name},
            "role": {"before": None, "after": role.value},
            "organisation_id": {"before": None, "after": organisation_public_id},
        },
    )
    return IssuedKey(api_key=api_key, secret=secret)


async def require_grantable(
    session: AsyncSession,
    principal: Principal,
    organisation_public_id: str | None,
    *,
    role: Role,
    scopes: Sequence[str] | None,
) -> None:
    """A caller hands out no scope it lacks (the scopes asked for, or all of the role's),
    and an org-bound caller only access within its own organisations."""
    known = {scope.value: scope for scope in Scope}
    granted = ROLE_SCOPES[role] if scopes is None else [known[s] for s in scopes if s in known]
    principal.require_grantable(granted, "a key")
    if organisation_public_id is None:
        principal.require_organisation(None)
        return
    organisation = await OrganisationRepository(session).get_by_public_id(organisation_public_id)
    if organisation is None or not principal.can_see_organisation(organisation.id):
        raise NotFound(f"Organisation {organisation_public_id} does not exist.")


async def get_api_key(session: AsyncSession, principal: Principal, public_id: str) -> ApiKey:
    api_key = await ApiKeyRepository(session).get_by_public_id(public_id)
    if api_key is None or not principal.can_see_organisation(api_key.organisation_id):
        raise NotFound(f"API key {public_id} does not exist.", code="API_KEY_NOT_FOUND")
    return api_key


async def revoke_api_key(
    session: AsyncSession, actor: Actor, public_id: str, *, principal: Principal | None = None
) -> ApiKey:
    api_key = await ApiKeyRepository(session).get_by_public_id(public_id)
    if principal is not None and api_key is not None:
        api_key = await get_api_key(session, principal, public_id)
    if api_key is None:
        raise NotFound(f"API key {public_id} does not exist.")
    if api_key.revoked_at is not None:
        raise Conflict(f"API key {public_id} is already revoked.", code="ALREADY_REVOKED")
    api_key.revoked_at = utcnow()
    record_write(
        session,
        actor,
        action="api_key.revoke",
        object_type="api_key",
        object_id=api_key.public_id,
        changes={"revoked_at": {"before": None, "after": api_key.revoked_at.isoformat()}},
    )
    return api_key


async def ensure_admin_key(session: AsyncSession, actor: Actor) -> IssuedKey | None:
    """Create an installation-wide admin key unless an active one exists."""
    if await ApiKeyRepository(session).any_active_admin():
        return None
    return await create_api_key(session, actor, name="admin", role=Role.ADMIN)


def effective_scopes(api_key: ApiKey) -> frozenset[Scope]:
    granted = ROLE_SCOPES[Role(api_key.role)]
    requested = api_key.scopes.get("scopes")
    if requested is None:
        return granted
    return frozenset(s for s in granted if s.value in requested)


async def authenticate(
    session: AsyncSession,
    raw_key: str,
    *,
    request_id: str | None = None,
    client_ip: str | None = None,
) -> Principal:
    prefix = keys.lookup_prefix(raw_key)
    record = None
    if prefix:
        record = await _KEY_CACHE.get_or_load(session, prefix, lambda: _key_record(session, prefix))
    return _principal_for(record, raw_key, request_id=request_id, client_ip=client_ip)


async def authenticate_outside_transaction(
    open_session: Callable[[], AbstractAsyncContextManager[AsyncSession]],
    raw_key: str,
    *,
    request_id: str | None = None,
    client_ip: str | None = None,
) -> Principal:
    """`authenticate` before any transaction: a session is opened only when the key is not
    in the process's cache."""
    prefix = keys.lookup_prefix(raw_key)
    record = None
    if prefix:

        async def load() -> KeyRecord | None:
            async with open_session() as session:
                return await _key_record(session, prefix)

        record = await _KEY_CACHE.get_or_load_outside(prefix, load)
    return _principal_for(record, raw_key, request_id=request_id, client_ip=client_ip)


def _principal_for(
    record: KeyRecord | None, raw_key: str, *, request_id: str | None, client_ip: str | None
) -> Principal:
    # Compare a digest even when no key was found, so timing does not reveal prefixes.
    stored = record.key_hash if record else keys.digest("not-a-key")
    if not keys.matches(raw_key, stored) or record is None:
        raise Unauthorized("The API key is not valid.", code="INVALID_API_KEY")
    if record.revoked:
        raise Unauthorized("The API key has been revoked.", code="API_KEY_REVOKED")
    return Principal(
        key_id=record.key_id,
        key_public_id=record.key_public_id,
        role=record.role,
        scopes=record.scopes,
        organisation_id=record.organisation_id,
        visible_organisation_ids=record.visible_organisation_ids,
        rate_limit=record.rate_limit,
        request_id=request_id,
        client_ip=client_ip,
    )
