"""FastAPI dependencies: authenticate the caller, enforce scopes, apply limits."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth import service
from memberhub.auth.principal import Principal
from memberhub.auth.roles import Scope
from memberhub.idempotency import service as idempotency
from memberhub.kit.errors import IdempotencyKeyReused, Unauthorized, ValidationFailed
from memberhub.kit.http import get_session, received_body

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer mh_…`")


def _key_of(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized(
            "Send an API key as `Authorization: Bearer mh_…`.", code="MISSING_API_KEY"
        )
    return credentials.credentials


async def _principal(request: Request, session: AsyncSession, key: str) -> Principal:
    return await service.authenticate(
        session,
        key,
        request_id=getattr(request.state, "request_id", None),
        client_ip=request.client.host if request.client else None,
    )


async def authenticate_first(request: Request) -> None:
    """Check the API key before the request's body is read or its transaction begins
    (`CheckedRoute`): `authenticate` then takes the principal found here. Requests without
    a valid key are counted per client address (`UNAUTHENTICATED_RATE_LIMIT`); past that
    limit the address gets 429 until the window ends, whatever key it sends."""
    limiter = request.app.state.rate_limiter
    limit = request.app.state.settings.unauthenticated_rate_limit
    address = request.client.host if request.client else "unknown"
    await limiter.refuse_if_spent(address, limit, namespace="ip")
    try:
        request.state.principal = await service.authenticate_outside_transaction(
            request.app.state.db.request_read_sessionmaker,
            _key_of(await bearer(request)),
            request_id=getattr(request.state, "request_id", None),
            client_ip=address if request.client else None,
        )
    except Unauthorized:
        await limiter.hit(address, limit, namespace="ip")
        raise


async def authenticate(
    request: Request,
    response: Response,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    session: Annotated[AsyncSession, Depends(get_session)],
) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        principal = await _principal(request, session, _key_of(credentials))
    limiter = request.app.state.rate_limiter
    quota = await limiter.hit(principal.key_public_id, principal.rate_limit)
    quota_headers = quota.headers() if quota is not None else {}
    response.headers.update(quota_headers)
    if request.method == "POST":
        await _check_idempotency(request, session, principal, quota_headers)
    return principal


# Routes depending on `authenticate` check the key before reading the body.
authenticate.authenticates_first = True  # type: ignore[attr-defined]


async def _check_idempotency(
    request: Request, session: AsyncSession, principal: Principal, quota_headers: dict[str, str]
) -> None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return
    if not key or len(key) > idempotency.MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed(
            "Idempotency-Key must be 1 to 255 printable characters.",
            details={"header": "Idempotency-Key"},
        )
    body = await received_body(request)
    method, path, query = request.method, request.url.path, request.url.query
    content = idempotency.canonical_body(body, request.headers.get("content-type"))
    fingerprint = idempotency.fingerprint(method, path, query, content)
    await idempotency.lock(session, principal.key_id, key)
    record = await idempotency.find(session, principal.key_id, key)
    if record is not None:
        # Also as the bytes: a response stored before JSON bodies were compared by content.
        if record.request_fingerprint != fingerprint and (
            content is body
            or record.request_fingerprint != idempotency.fingerprint(method, path, query, body)
        ):
            raise IdempotencyKeyReused()
        replayed = idempotency.replay(record, request.app.state.secret_box)
        replayed.headers.update(quota_headers)
        raise idempotency.IdempotentReplay(replayed)
    request.state.idempotency = idempotency.PendingKey(principal.key_id, key, fingerprint)


class RequireScope:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def __call__(self, principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        principal.require_scope(self.scope)
        return principal


# One alias per scope: `principal: MembersReader` in a route signature.
OrganisationsReader = Annotated[Principal, Depends(RequireScope(Scope.ORGANISATIONS_READ))]
OrganisationsWriter = Annotated[Principal, Depends(RequireScope(Scope.ORGANISATIONS_WRITE))]
MembersReader = Annotated[Principal, Depends(RequireScope(Scope.MEMBERS_READ))]
MembersWriter = Annotated[Principal, Depends(RequireScope(Scope.MEMBERS_WRITE))]
MembersEraser = Annotated[Principal, Depends(RequireScope(Scope.MEMBERS_DELETE))]
MembershipsReader = Annotated[Principal, Depends(RequireScope(Scope.MEMBERSHIPS_READ))]
MembershipsWriter = Annotated[Principal, Depends(RequireScope(Scope.MEMBERSHIPS_WRITE))]
PlansReader = Annotated[Principal, Depends(RequireScope(Scope.PLANS_READ))]
PlansWriter = Annotated[Principal, Depends(RequireScope(Scope.PLANS_WRITE))]
EventsReader = Annotated[Principal, Depends(RequireScope(Scope.EVENTS_READ))]
AuditReader = Annotated[Principal, Depends(RequireScope(Scope.AUDIT_READ))]
ProgramReader = Annotated[Principal, Depends(RequireScope(Scope.PROGRAM_READ))]
ProgramWriter = Annotated[Principal, Depends(RequireScope(Scope.PROGRAM_WRITE))]
PointsReader = Annotated[Principal, Depends(RequireScope(Scope.POINTS_READ))]
PointsEarner = Annotated[Principal, Depends(RequireScope(Scope.POINTS_EARN))]
PointsAwarder = Annotated[Principal, Depends(RequireScope(Scope.POINTS_AWARD))]
PointsDeducter = Annotated[Principal, Depends(RequireScope(Scope.POINTS_DEDUCT))]
PointsExtender = Annotated[Principal, Depends(RequireScope(Scope.POINTS_EXTEND))]
PointsTransferrer = Annotated[Principal, Depends(RequireScope(Scope.POINTS_TRANSFER))]
PointsRecoverer = Annotated[Principal, Depends(RequireScope(Scope.POINTS_RECOVER))]
PointsBulkWriter = Annotated[Principal, Depends(RequireScope(Scope.POINTS_BULK))]
TiersReader = Annotated[Principal, Depends(RequireScope(Scope.TIERS_READ))]
TiersWriter = Annotated[Principal, Depends(RequireScope(Scope.TIERS_WRITE))]
TiersAssigner = Annotated[Principal, Depends(RequireScope(Scope.TIERS_ASSIGN))]
RewardsReader = Annotated[Principal, Depends(RequireScope(Scope.REWARDS_READ))]
RewardsWriter = Annotated[Principal, Depends(RequireScope(Scope.REWARDS_WRITE))]
RewardsClaimer = Annotated[Principal, Depends(RequireScope(Scope.REWARDS_CLAIM))]
ApprovalsReader = Annotated[Principal, Depends(RequireScope(Scope.APPROVALS_READ))]
ApprovalsDecider = Annotated[Principal, Depends(RequireScope(Scope.APPROVALS_DECIDE))]
AlertsReader = Annotated[Principal, Depends(RequireScope(Scope.ALERTS_READ))]
AlertsWriter = Annotated[Principal, Depends(RequireScope(Scope.ALERTS_WRITE))]
WebhooksReader = Annotated[Principal, Depends(RequireScope(Scope.WEBHOOKS_READ))]
WebhooksWriter = Annotated[Principal, Depends(RequireScope(Scope.WEBHOOKS_WRITE))]
IntegrationsReader = Annotated[Principal, Depends(RequireScope(Scope.INTEGRATIONS_READ))]
IntegrationsWriter = Annotated[Principal, Depends(RequireScope(Scope.INTEGRATIONS_WRITE))]
LeadsReader = Annotated[Principal, Depends(RequireScope(Scope.LEADS_READ))]
LeadsWriter = Annotated[Principal, Depends(RequireScope(Scope.LEADS_WRITE))]
AnalyticsReader = Annotated[Principal, Depends(RequireScope(Scope.ANALYTICS_READ))]
ActivitiesReader = Annotated[Principal, Depends(RequireScope(Scope.ACTIVITIES_READ))]
ActivitiesWriter = Annotated[Principal, Depends(RequireScope(Scope.ACTIVITIES_WRITE))]
EarningRulesReader = Annotated[Principal, Depends(RequireScope(Scope.EARNING_RULES_READ))]
EarningRulesWriter = Annotated[Principal, Depends(RequireScope(Scope.EARNING_RULES_WRITE))]
NotificationsReader = Annotated[Principal, Depends(RequireScope(Scope.NOTIFICATIONS_READ))]
NotificationsWriter = Annotated[Principal, Depends(RequireScope(Scope.NOTIFICATIONS_WRITE))]
StaffReader = Annotated[Principal, Depends(RequireScope(Scope.STAFF_READ))]
StaffWriter = Annotated[Principal, Depends(RequireScope(Scope.STAFF_WRITE))]
ApiKeysReader = Annotated[Principal, Depends(RequireScope(Scope.API_KEYS_READ))]
ApiKeysWriter = Annotated[Principal, Depends(RequireScope(Scope.API_KEYS_WRITE))]
