"""Recording the activities that mapped inbound events stand for (see `activity_mapping`).

Nothing here decides what an activity earns: the event's activity is recorded by
`activities.service.record_activity` under the integration's own source, with the sender's
id as source id, so a redelivered event is a replay and earns nothing twice. An event whose
payload lacks a mapped value, or holds one of the wrong type, fails with the problems named,
and no activity is written.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.activities.service import record_activity
from memberhub.auth.principal import Principal
from memberhub.integrations.activity_mapping import (
    ActivityMapping,
    MappingFailed,
    MappingTest,
    MappingTestOut,
    build_activity,
)
from memberhub.integrations.hub import parse_config
from memberhub.integrations.models import InboundEvent, Integration
from memberhub.integrations.providers import get_provider
from memberhub.kit.actor import Actor
from memberhub.kit.errors import ValidationFailed
from memberhub.organisations.repository import OrganisationRepository


async def _principal(session: AsyncSession, integration: Integration) -> Principal:
    """The integration acting on its own: within its organisation (and its chapters)."""
    principal = Principal.system(Actor.system(f"integration:{integration.public_id}"))
    if integration.organisation_id is None:
        return principal
    visible = await OrganisationRepository(session).subtree_ids(integration.organisation_id)
    return dataclasses.replace(
        principal,
        organisation_id=integration.organisation_id,
        visible_organisation_ids=frozenset(visible),
    )


async def record_mapped_activity(
    session: AsyncSession,
    integration: Integration,
    mapping: ActivityMapping,
    event: InboundEvent,
    *,
    now: datetime,
) -> dict[str, Any]:
    """Record the activity an inbound event stands for; return what was done, for the
    event's result. Raises ACTIVITY_MAPPING_FAILED, naming the problems, when the event's
    body does not give what the mapping asks for."""
    try:
        payload = json.loads(event.body)
    except ValueError:
        raise MappingFailed("The event's body is not JSON; no activity was recorded.") from None
    activity, problems = build_activity(
        mapping, payload, source=integration.public_id, received_at=event.received_at
    )
    if activity is None:
        raise MappingFailed(
            "The event does not give the activity its mapping asks for: "
            + "; ".join(f"{problem.field}: {problem.message}" for problem in problems),
            details={"problems": [problem.model_dump() for problem in problems]},
        )
    recorded = await record_activity(
        session, await _principal(session, integration), activity, now=now
    )
    out = recorded.activity
    return {
        "activity_id": out.id,
        "member_id": out.member_id,
        "status": out.status,
        "replayed": recorded.replayed,
        "points": 0 if recorded.replayed else sum(credit.points for credit in out.credits),
    }


def try_mapping(integration: Integration, test: MappingTest, *, now: datetime) -> MappingTestOut:
    """What the sample payload would record under the mapping sent, else the integration's
    saved one; nothing is written. 422 NO_ACTIVITY_MAPPING when there is neither, or the
    integration's provider takes no mapping."""
    provider = get_provider(integration.provider)
    if provider is None or "activity" not in provider.config_model.model_fields:
        raise ValidationFailed(
            f"Integration {integration.public_id} does not record activities from its events.",
            code="NO_ACTIVITY_MAPPING",
        )
    mapping = test.mapping or getattr(parse_config(provider, integration.config), "activity", None)
    if not isinstance(mapping, ActivityMapping):
        raise ValidationFailed(
            f"Integration {integration.public_id} has no activity mapping: save one as "
            "config.activity, or send one as `mapping`.",
            code="NO_ACTIVITY_MAPPING",
        )
    activity, problems = build_activity(
        mapping, test.payload, source=integration.public_id, received_at=now
    )
    return MappingTestOut(activity=activity, problems=problems)
