"""Consent: what each member agreed to, by purpose, and the history of every change.

One model serves every reader. A flag per purpose sits on the member (`consent_<purpose>`);
every change of a flag, whoever makes it, writes a `ConsentChange` row and a
`member.consent_changed` event in the same transaction, so the history and the outbox
never disagree with the flag.

Purposes:
- `email`, `sms`: the channels notifications may use (kept as they were).
- `analytics`: events about the member may go to analytics sinks (GA4, Segment).
- `profiling`: the member may be profiled (segments built from behaviour).
- `crm`: the member may be pushed to CRMs.
- `marketing_email`: the member may be on marketing lists (Mailchimp audiences).

A connector declares the purpose it serves and sends nothing about a member for whom
`has_consent(member, purpose)` is false; withdrawing consent stops what follows (and, where
the vendor allows, removes or unsubscribes the member there). An erased member has no
consent for anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Literal, get_args

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from memberhub.events.catalog import MemberConsentChanged
from memberhub.events.service import emit
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.members.models import ConsentChange, Member

Purpose = Literal["email", "sms", "analytics", "profiling", "crm", "marketing_email"]
PURPOSES: tuple[Purpose, ...] = get_args(Purpose)


class ConsentSource:
    """Where a change of consent came from (`ConsentChange.source`)."""

    API = "api"
    CONSOLE = "console"
    IMPORT = "import"
    CRM = "crm"
    VENDOR_WEBHOOK = "vendor_webhook"
    UNSUBSCRIBE_LINK = "unsubscribe_link"
    ERASURE = "erasure"
    MIGRATION = "migration"
    SYSTEM = "system"

    ALL = (
        API,
        CONSOLE,
        IMPORT,
        CRM,
        VENDOR_WEBHOOK,
        UNSUBSCRIBE_LINK,
        ERASURE,
        MIGRATION,
        SYSTEM,
    )


def _check(purpose: str) -> Purpose:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown consent purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    return purpose


def consent_column(purpose: str) -> InstrumentedAttribute[bool]:
    """The member column holding a purpose's flag, for queries that select by consent."""
    column: InstrumentedAttribute[bool] = getattr(Member, f"consent_{_check(purpose)}")
    return column


def has_consent(member: Member, purpose: str) -> bool:
    """Whether anything about the member may be sent for `purpose`."""
    if member.deleted_at is not None:
        return False
    return bool(getattr(member, f"consent_{_check(purpose)}"))


def current_consent(member: Member) -> dict[str, bool]:
    """Every purpose's flag."""
    return {purpose: bool(getattr(member, f"consent_{purpose}")) for purpose in PURPOSES}


def record_consent_changes(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    before: Mapping[str, bool],
    *,
    source: str,
    occurred_at: datetime | None = None,
    announce: bool = True,
) -> list[str]:
    """The history rows and `member.consent_changed` events of the flags that differ from
    `before` (for a writer that has set the flags itself); returns the purposes changed.
    The member must have its id (flushed). A new member's consent is announced by
    `member.created` itself (`announce=False`): only its history rows are written."""
    at = occurred_at or utcnow()
    changed: list[str] = []
    for purpose, granted in current_consent(member).items():
        if bool(before.get(purpose, False)) == granted:
            continue
        changed.append(purpose)
        session.add(
            ConsentChange(
                member_id=member.id,
                purpose=purpose,
                granted=granted,
                actor=actor.id[:64],
                source=source,
                client_ip=actor.client_ip,
                occurred_at=at,
            )
        )
        if not announce:
            continue
        emit(
            session,
            MemberConsentChanged(
                member_id=member.public_id,
                organisation_id=_organisation_public_id(member),
                purpose=purpose,
                granted=granted,
                source=source,
                occurred_at=at,
            ),
            organisation_id=member.organisation_id,
            member_public_id=member.public_id,
            occurred_at=at,
        )
    return changed


def _organisation_public_id(member: Member) -> str | None:
    # Every writer has loaded the organisation (it is in the member's API shape).
    return member.organisation.public_id if member.organisation is not None else None


async def set_consent(
    session: AsyncSession,
    actor: Actor,
    member: Member,
    purpose: str,
    granted: bool,
    *,
    source: str,
    ip: str | None = None,
) -> bool:
    """Grant or withdraw one purpose as a whole write: the flag, its history row, the
    `member.consent_changed` and `member.updated` events and the audit entry, in the
    caller's transaction. For vendor webhooks (an unsubscribe) and other code that is not
    an API request. Returns False when the flag already had that value (nothing written).
    """
    _check(purpose)
    if source not in ConsentSource.ALL:
        raise ValueError(f"unknown consent source {source!r}")
    if bool(getattr(member, f"consent_{purpose}")) == granted:
        return False
    # Imported here: the member service imports this module.
    from memberhub.auth.principal import Principal
    from memberhub.members.schemas import MemberPatch
    from memberhub.members.service import update_member

    principal = dataclasses.replace(
        Principal.system(actor), request_id=actor.request_id, client_ip=ip or actor.client_ip
    )
    await update_member(
        session,
        principal,
        member.public_id,
        MemberPatch.model_validate({"consent": {purpose: granted}}),
        if_match=None,
        consent_source=source,
    )
    return True
