"""The sender: queued notifications go out through their channel's integration.

Three steps, each its own short transaction, so no send runs inside one:

1. **Claim.** Due queued notifications are leased to this sender (`FOR UPDATE SKIP
   LOCKED` on PostgreSQL): `attempts` goes up, `next_attempt_at` becomes the end of the
   lease and `claim` a token of this pass. A notification whose sender died is due again
   when its lease ends; it is then sent again, which is the one way a message can go out
   twice: an attempt in flight when its process died. In the same transaction each
   is checked again against what may have changed since it was planned: a member who
   withdrew consent or turned marketing off, an address put on the suppression list (a
   bounce, a spam report, an unsubscribe) make it `suppressed` with the reason instead;
   an SMS or push falling due inside the quiet hours (a retry at night) waits for their
   end, no attempt counted.
2. **Send**, a round of `concurrency` at a time, through the provider's
   `MessageChannel` and the gateway.
3. **Record** each round as it finishes (so a crash leaves at most one round sent and
   unrecorded: the attempts in flight), only where the claim is still ours: sent with
   the provider's message id; failed for good on a permanent refusal
   (`SendRejected(permanent=True)`, the provider's words kept); otherwise queued again
   after the next delay of the retry schedule, failed when the schedule is spent.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import Table, and_, bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.integrations.gateway import CircuitOpen, GatewayError
from memberhub.integrations.hub import IntegrationHub, UnknownProvider
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import as_message_channel, get_provider
from memberhub.integrations.providers.base import (
    MessageChannel,
    OutgoingMessage,
    SendRejected,
)
from memberhub.kit.clock import utcnow
from memberhub.kit.db import Database
from memberhub.members.models import Member
from memberhub.notifications import planning, service
from memberhub.notifications.models import (
    Channel,
    DeviceToken,
    Notification,
    NotificationPreference,
    NotificationStatus,
)
from memberhub.notifications.repository import NotificationRepository
from memberhub.notifications.schemas import listed_as
from memberhub.program import service as program_service

log = structlog.get_logger("memberhub.notifications.sending")

_NOTIFICATIONS = cast(Table, Notification.__table__)
CLAIM_BATCH = 200
CONCURRENCY = 8
DEFAULT_LEASE_SECONDS = 120.0
ERROR_CHARS = 2000
# The channels that wait out the quiet hours.
QUIET_CHANNELS = frozenset({Channel.SMS, Channel.PUSH})


@dataclass(frozen=True)
class _Claimed:
    id: int
    public_id: str
    message_type: str
    channel: str
    recipient: str
    subject: str | None
    text: str
    html: str | None
    headers: dict[str, str]
    integration_id: int | None
    attempts: int


@dataclass(frozen=True)
class _Outcome:
    id: int
    status: str
    provider_message_id: str | None = None
    integration_id: int | None = None
    error: str | None = None
    permanent: bool = False
    # A push token the provider says no longer exists: forgotten with the outcome.
    forget_token: str | None = None


class NotificationSender:
    def __init__(
        self,
        db: Database,
        hub: IntegrationHub,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        concurrency: int = CONCURRENCY,
        claim_batch: int = CLAIM_BATCH,
    ) -> None:
        self.db = db
        self.hub = hub
        self.lease = timedelta(seconds=lease_seconds)
        self.concurrency = concurrency
        self.claim_batch = claim_batch

    async def send_due(self, now: datetime | None = None, *, max_batches: int = 50) -> int:
        """Send what is due, a claimed batch at a time; returns how many were handled."""
        handled = 0
        for _ in range(max_batches):
            claim, claimed, withheld = await self._claim(now or utcnow())
            handled += withheld
            if not claimed:
                if withheld:
                    continue
                break
            integrations = await self._integrations()
            # Recorded a round of sends at a time: what a crash leaves sent but unrecorded
            # (and so sends again after the lease) is at most one round in flight. Each
            # later round renews the lease of its rows first, and drops any another worker
            # took over meanwhile (this one outlived its lease: a slow vendor, a long wait).
            for start in range(0, len(claimed), self.concurrency):
                round_ = claimed[start : start + self.concurrency]
                if start:
                    round_ = await self._renew(claim, round_, now or utcnow())
                    if not round_:
                        continue
                outcomes = await asyncio.gather(
                    *(self._send_one(item, integrations) for item in round_)
                )
                await self._record(claim, outcomes)
            handled += len(claimed)
        return handled

    async def _renew(self, claim: str, round_: list[_Claimed], now: datetime) -> list[_Claimed]:
        """The rows of `round_` still held by `claim`, their lease renewed from `now`."""
        async with self.db.transaction() as session:
            held = set(
                (
                    await session.execute(
                        update(_NOTIFICATIONS)
                        .where(
                            _NOTIFICATIONS.c.id.in_([item.id for item in round_]),
                            _NOTIFICATIONS.c.claim == claim,
                            _NOTIFICATIONS.c.status == NotificationStatus.QUEUED,
                        )
                        .values(next_attempt_at=now + self.lease)
                        .returning(_NOTIFICATIONS.c.id)
                    )
                ).scalars()
            )
        if len(held) < len(round_):
            log.warning("notification_lease_lost", count=len(round_) - len(held))
        return [item for item in round_ if item.id in held]

    async def _claim(self, now: datetime) -> tuple[str, list[_Claimed], int]:
        """Lease a batch of due notifications; those that may no longer go out (see
        `_withhold`) are settled instead. Returns the claim, what to send and how many
        were withheld or deferred."""
        claim = secrets.token_hex(8)
        async with self.db.transaction() as session:
            query = (
                select(
                    Notification.id,
                    Notification.public_id,
                    Notification.message_type,
                    Notification.channel,
                    Notification.recipient,
                    Notification.subject,
                    Notification.text,
                    Notification.html,
                    Notification.headers,
                    Notification.integration_id,
                    Notification.attempts,
                    Notification.category,
                    Notification.audience,
                    Notification.member_id,
                    Notification.recipient_key,
                )
                .where(
                    Notification.status == NotificationStatus.QUEUED,
                    Notification.next_attempt_at <= now,
                )
                .order_by(Notification.next_attempt_at, Notification.id)
                .limit(self.claim_batch)
            )
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            rows = (await session.execute(query)).all()
            if not rows:
                return claim, [], 0
            withheld = await _withhold(session, rows, now)
            rows = [row for row in rows if row.id not in withheld]
            if not rows:
                return claim, [], len(withheld)
            lease_end = now + self.lease
            await session.execute(
                update(_NOTIFICATIONS)
                .where(_NOTIFICATIONS.c.id.in_([row.id for row in rows]))
                .values(
                    claim=claim,
                    attempts=_NOTIFICATIONS.c.attempts + 1,
                    next_attempt_at=lease_end,
                    updated_at=now,
                )
            )
        return (
            claim,
            [
                _Claimed(
                    id=row.id,
                    public_id=row.public_id,
                    message_type=row.message_type,
                    channel=row.channel,
                    recipient=row.recipient or "",
                    subject=row.subject,
                    text=row.text,
                    html=row.html,
                    headers=dict(row.headers or {}),
                    integration_id=row.integration_id,
                    attempts=row.attempts + 1,
                )
                for row in rows
            ],
            len(withheld),
        )

    async def _integrations(self) -> dict[int, tuple[Integration, MessageChannel, set[str]]]:
        async with self.db.transaction(read_only=True) as session:
            found = {}
            for integration in await session.scalars(
                select(Integration).where(Integration.enabled.is_(True)).order_by(Integration.id)
            ):
                provider = get_provider(integration.provider)
                channel = as_message_channel(provider) if provider is not None else None
                if channel is not None:
                    found[integration.id] = (integration, channel, set(channel.message_channels))
            return found

    async def _send_one(
        self,
        item: _Claimed,
        integrations: dict[int, tuple[Integration, MessageChannel, set[str]]],
    ) -> _Outcome:
        chosen = integrations.get(item.integration_id) if item.integration_id else None
        if chosen is None or item.channel not in chosen[2]:
            # Its integration was disabled or removed: another for the channel, if any.
            chosen = next((i for i in integrations.values() if item.channel in i[2]), None)
        if chosen is None:
            return _Outcome(item.id, "retry", error=f"no enabled integration sends {item.channel}")
        integration, channel, _ = chosen
        message = OutgoingMessage(
            channel=item.channel,  # type: ignore[arg-type]
            to=item.recipient,
            reference=item.public_id,
            text=item.text,
            subject=item.subject,
            html=item.html,
            headers=item.headers,
            # A push's data payload: what the app needs to route the tap.
            data={"notification_id": item.public_id, "message_type": item.message_type}
            if item.channel == "push"
            else {},
        )
        try:
            connection = self.hub.connection(integration)
            result = await channel.send_message(connection, message)
        except SendRejected as exc:
            gone = exc.recipient_gone and item.channel == Channel.PUSH and item.recipient
            return _Outcome(
                item.id,
                "failed" if exc.permanent else "retry",
                integration_id=integration.id,
                error=str(exc)[:ERROR_CHARS],
                permanent=exc.permanent,
                forget_token=item.recipient if gone else None,
            )
        except (GatewayError, CircuitOpen, UnknownProvider) as exc:
            return _Outcome(
                item.id, "retry", integration_id=integration.id, error=str(exc)[:ERROR_CHARS]
            )
        except Exception as exc:
            log.exception("notification_send_failed", notification=item.public_id)
            return _Outcome(
                item.id,
                "retry",
                integration_id=integration.id,
                error=f"{type(exc).__name__}: {exc}"[:ERROR_CHARS],
            )
        return _Outcome(
            item.id,
            "sent",
            provider_message_id=result.provider_message_id,
            integration_id=integration.id,
        )

    async def _record(self, claim: str, outcomes: Sequence[_Outcome]) -> None:
        now = utcnow()
        async with self.db.transaction() as session:
            settings = await service.get_settings(session)
            delays = settings.retry_delays_seconds
            attempts = dict(
                (
                    await session.execute(
                        select(Notification.id, Notification.attempts).where(
                            Notification.id.in_([o.id for o in outcomes])
                        )
                    )
                ).all()
            )
            rows = [
                _recorded_values(outcome, attempts.get(outcome.id, 1), delays, now)
                for outcome in outcomes
            ]
            await _update_claimed(session, claim, rows)
            gone = sorted({o.forget_token for o in outcomes if o.forget_token})
            if gone:
                # The app was uninstalled: no push goes to the token again.
                await session.execute(delete(DeviceToken).where(DeviceToken.token.in_(gone)))
                log.info("device_tokens_forgotten", count=len(gone))


async def _withhold(session: AsyncSession, rows: Sequence[Any], now: datetime) -> set[int]:
    """Check again, just before sending, what may have changed since a notification was
    planned: the member's consent and preferences (`no_consent`, `opted_out`,
    `member_deleted`), a push's device (`no_address` once forgotten or registered to another
    member) and the suppression list (`suppressed_address:<why>`), which mark it
    suppressed with the reason; and for SMS and push the quiet hours, which move it to
    their end without counting an attempt (a retry may fall due at night). Returns the
    ids of the rows settled here, which are not sent."""
    member_ids = {row.member_id for row in rows if row.member_id is not None}
    members: dict[int, Member] = {}
    preferences: dict[int, NotificationPreference] = {}
    if member_ids:
        members = {
            m.id: m for m in await session.scalars(select(Member).where(Member.id.in_(member_ids)))
        }
        preferences = {
            p.member_id: p
            for p in await session.scalars(
                select(NotificationPreference).where(
                    NotificationPreference.member_id.in_(member_ids)
                )
            )
        }
    repository = NotificationRepository(session)
    suppressed = {
        channel: await repository.suppressed_addresses(
            channel,
            {
                listed_as(row.channel, row.recipient, row.recipient_key)
                for row in rows
                if row.channel == channel
            },
        )
        for channel in (Channel.EMAIL, Channel.SMS, Channel.PUSH)
    }
    devices = await _devices_held(session, rows)
    reasons: dict[int, str] = {}
    for row in rows:
        if row.audience == "member":
            reason = planning.withheld_reason(
                members.get(row.member_id) if row.member_id is not None else None,
                preferences.get(row.member_id) if row.member_id is not None else None,
                row.channel,
                row.category,
            )
            if reason is not None:
                reasons[row.id] = reason
                continue
        if row.channel == Channel.PUSH and (row.member_id, row.recipient) not in devices:
            # The device was forgotten, or its token moved to another member (the phone
            # changed hands) while the push waited: it has no address of the member's now.
            reasons[row.id] = "no_address"
            continue
        listed = suppressed.get(row.channel, {}).get(
            listed_as(row.channel, row.recipient, row.recipient_key)
        )
        if listed is not None:
            reasons[row.id] = f"suppressed_address:{listed}"[:100]
    deferred = await _quiet_until(
        session,
        [row for row in rows if row.id not in reasons and row.channel in QUIET_CHANNELS],
        members,
        preferences,
        now,
    )
    if reasons:
        await (await session.connection()).execute(
            update(_NOTIFICATIONS)
            .where(_NOTIFICATIONS.c.id == bindparam("row_id"))
            .values(
                status=NotificationStatus.SUPPRESSED,
                reason=bindparam("v_reason"),
                next_attempt_at=None,
                claim=None,
                updated_at=now,
            ),
            [{"row_id": row_id, "v_reason": reason} for row_id, reason in reasons.items()],
        )
        log.info("notifications_withheld", count=len(reasons))
    if deferred:
        await (await session.connection()).execute(
            update(_NOTIFICATIONS)
            .where(_NOTIFICATIONS.c.id == bindparam("row_id"))
            .values(next_attempt_at=bindparam("v_due"), updated_at=now),
            [{"row_id": row_id, "v_due": due} for row_id, due in deferred.items()],
        )
    return set(reasons) | set(deferred)


async def _devices_held(session: AsyncSession, rows: Sequence[Any]) -> set[tuple[int, str]]:
    """(member id, token) of the devices that the push `rows` go to and that are still
    registered to their member."""
    pushes = [row for row in rows if row.channel == Channel.PUSH and row.member_id is not None]
    if not pushes:
        return set()
    held = await session.execute(
        select(DeviceToken.member_id, DeviceToken.token).where(
            DeviceToken.member_id.in_({row.member_id for row in pushes}),
            DeviceToken.token.in_({row.recipient for row in pushes}),
        )
    )
    return {(member_id, token) for member_id, token in held.all()}


async def _quiet_until(
    session: AsyncSession,
    rows: Sequence[Any],
    members: dict[int, Member],
    preferences: dict[int, NotificationPreference],
    now: datetime,
) -> dict[int, datetime]:
    """Of SMS and push `rows`, those due inside the quiet hours, with when those end."""
    if not rows:
        return {}
    settings = await service.get_settings(session)
    start, end = settings.quiet_hours.window()
    if start == end:
        return {}
    default_zone = await program_service.program_zone(session)
    deferred = {}
    for row in rows:
        zone = default_zone
        preference = preferences.get(row.member_id) if row.member_id is not None else None
        if preference is not None and preference.timezone:
            zone = ZoneInfo(preference.timezone)
        due = planning.quiet_hours_end(now, zone, start, end)
        if due > now:
            deferred[row.id] = due
    return deferred


def _recorded_values(
    outcome: _Outcome, attempts: int, delays: Sequence[int], now: datetime
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "row_id": outcome.id,
        "status": NotificationStatus.QUEUED,
        "reason": None,
        "error": outcome.error,
        "next_attempt_at": None,
        "provider_message_id": outcome.provider_message_id,
        "sent_at": None,
        "integration_id": outcome.integration_id,
        "updated_at": now,
    }
    if outcome.status == "sent":
        values.update(status=NotificationStatus.SENT, sent_at=now)
    elif outcome.status == "failed":
        values.update(status=NotificationStatus.FAILED, reason="rejected")
    elif attempts > len(delays):
        values.update(status=NotificationStatus.FAILED, reason="retries_exhausted")
    else:
        values.update(next_attempt_at=now + timedelta(seconds=delays[attempts - 1]))
    return values


async def _update_claimed(session: AsyncSession, claim: str, rows: list[dict[str, Any]]) -> None:
    """Write the results, each only where this pass still holds the claim (a lease that
    ran out and was claimed again belongs to the newer pass)."""
    table = _NOTIFICATIONS
    statement = (
        update(table)
        .where(and_(table.c.id == bindparam("row_id"), table.c.claim == bindparam("claim_token")))
        .values(
            {
                name: bindparam(f"v_{name}", type_=table.c[name].type)
                for name in (
                    "status",
                    "reason",
                    "error",
                    "next_attempt_at",
                    "provider_message_id",
                    "sent_at",
                    "integration_id",
                    "updated_at",
                )
            }
            | {"claim": None}
        )
    )
    parameters = [
        {"row_id": row["row_id"], "claim_token": claim}
        | {f"v_{name}": value for name, value in row.items() if name != "row_id"}
        for row in rows
    ]
    connection = await session.connection()
    await connection.execute(statement, parameters)
