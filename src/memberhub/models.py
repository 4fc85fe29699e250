"""Imports every model so that the metadata (and Alembic) sees all tables."""

from memberhub.audit.models import AuditEntry
from memberhub.auth.models import ApiKey
from memberhub.events.models import Event
from memberhub.idempotency.models import IdempotencyRecord
from memberhub.kit.db import Base
from memberhub.members.models import Member
from memberhub.memberships.models import MembershipPlan, MembershipTerm, MemberStatusChange
from memberhub.organisations.models import Organisation
from memberhub.worker.models import WorkerHeartbeat

__all__ = [
    "ApiKey",
    "AuditEntry",
    "Base",
    "Event",
    "IdempotencyRecord",
    "Member",
    "MemberStatusChange",
    "MembershipPlan",
    "MembershipTerm",
    "Organisation",
    "WorkerHeartbeat",
]
