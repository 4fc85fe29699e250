"""Roles and the scopes each one grants."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    MANAGER = "manager"
    SUPPORT_AGENT = "support_agent"
    INTEGRATION = "integration"


class Scope(StrEnum):
    ORGANISATIONS_READ = "organisations:read"
    ORGANISATIONS_WRITE = "organisations:write"
    MEMBERS_READ = "members:read"
    MEMBERS_WRITE = "members:write"
    MEMBERS_DELETE = "members:delete"
    MEMBERSHIPS_READ = "memberships:read"
    MEMBERSHIPS_WRITE = "memberships:write"
    PLANS_READ = "plans:read"
    PLANS_WRITE = "plans:write"
    EVENTS_READ = "events:read"
    AUDIT_READ = "audit:read"


ROLE_SCOPES: dict[Role, frozenset[Scope]] = {
    Role.ADMIN: frozenset(Scope),
    Role.MANAGER: frozenset(
        {
            Scope.ORGANISATIONS_READ,
            Scope.MEMBERS_READ,
            Scope.MEMBERS_WRITE,
            Scope.MEMBERS_DELETE,
            Scope.MEMBERSHIPS_READ,
            Scope.MEMBERSHIPS_WRITE,
            Scope.PLANS_READ,
            Scope.EVENTS_READ,
        }
    ),
    Role.SUPPORT_AGENT: frozenset(
        {
            Scope.ORGANISATIONS_READ,
            Scope.MEMBERS_READ,
            Scope.MEMBERS_WRITE,
            Scope.MEMBERSHIPS_READ,
            Scope.PLANS_READ,
        }
    ),
    Role.INTEGRATION: frozenset(
        {
            Scope.ORGANISATIONS_READ,
            Scope.MEMBERS_READ,
            Scope.MEMBERS_WRITE,
            Scope.MEMBERSHIPS_READ,
            Scope.MEMBERSHIPS_WRITE,
            Scope.PLANS_READ,
            Scope.EVENTS_READ,
        }
    ),
}
