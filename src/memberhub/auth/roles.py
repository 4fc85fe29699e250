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
    PROGRAM_READ = "program:read"
    PROGRAM_WRITE = "program:write"
    POINTS_READ = "points:read"
    # Purchase-driven operations a connected system makes: earn, redeem, reverse.
    POINTS_EARN = "points:earn"
    POINTS_AWARD = "points:award"
    POINTS_DEDUCT = "points:deduct"
    POINTS_EXTEND = "points:extend"
    POINTS_TRANSFER = "points:transfer"
    POINTS_RECOVER = "points:recover"
    POINTS_BULK = "points:bulk"
    TIERS_READ = "tiers:read"
    TIERS_WRITE = "tiers:write"
    TIERS_ASSIGN = "tiers:assign"
    REWARDS_READ = "rewards:read"
    REWARDS_WRITE = "rewards:write"
    REWARDS_CLAIM = "rewards:claim"
    APPROVALS_READ = "approvals:read"
    APPROVALS_DECIDE = "approvals:decide"
    ALERTS_READ = "alerts:read"
    ALERTS_WRITE = "alerts:write"
    ANALYTICS_READ = "analytics:read"
    WEBHOOKS_READ = "webhooks:read"
    WEBHOOKS_WRITE = "webhooks:write"
    INTEGRATIONS_READ = "integrations:read"
    INTEGRATIONS_WRITE = "integrations:write"
    LEADS_READ = "leads:read"
    LEADS_WRITE = "leads:write"
    ACTIVITIES_READ = "activities:read"
    # Recording an activity earns by the earning rules, as `points:earn` earns by the rate.
    ACTIVITIES_WRITE = "activities:write"
    EARNING_RULES_READ = "earning_rules:read"
    EARNING_RULES_WRITE = "earning_rules:write"
    NOTIFICATIONS_READ = "notifications:read"
    NOTIFICATIONS_WRITE = "notifications:write"
    # Staff accounts and API keys: admins only.
    STAFF_READ = "staff:read"
    STAFF_WRITE = "staff:write"
    API_KEYS_READ = "api_keys:read"
    API_KEYS_WRITE = "api_keys:write"


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
            Scope.PROGRAM_READ,
            Scope.POINTS_READ,
            Scope.POINTS_EARN,
            Scope.POINTS_AWARD,
            Scope.POINTS_DEDUCT,
            Scope.POINTS_EXTEND,
            Scope.POINTS_TRANSFER,
            Scope.TIERS_READ,
            Scope.TIERS_ASSIGN,
            Scope.REWARDS_READ,
            Scope.REWARDS_CLAIM,
            Scope.APPROVALS_READ,
            Scope.APPROVALS_DECIDE,
            Scope.ALERTS_READ,
            Scope.ALERTS_WRITE,
            Scope.ANALYTICS_READ,
            Scope.WEBHOOKS_READ,
            Scope.INTEGRATIONS_READ,
            Scope.LEADS_READ,
            Scope.LEADS_WRITE,
            Scope.ACTIVITIES_READ,
            Scope.ACTIVITIES_WRITE,
            Scope.EARNING_RULES_READ,
            Scope.NOTIFICATIONS_READ,
        }
    ),
    Role.SUPPORT_AGENT: frozenset(
        {
            Scope.ORGANISATIONS_READ,
            Scope.MEMBERS_READ,
            Scope.MEMBERS_WRITE,
            Scope.MEMBERSHIPS_READ,
            Scope.PLANS_READ,
            Scope.PROGRAM_READ,
            Scope.POINTS_READ,
            Scope.POINTS_AWARD,
            Scope.POINTS_DEDUCT,
            Scope.TIERS_READ,
            Scope.REWARDS_READ,
            Scope.REWARDS_CLAIM,
            Scope.ALERTS_READ,
            Scope.LEADS_READ,
            Scope.LEADS_WRITE,
            Scope.ACTIVITIES_READ,
            Scope.EARNING_RULES_READ,
            Scope.NOTIFICATIONS_READ,
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
            Scope.PROGRAM_READ,
            Scope.POINTS_READ,
            Scope.POINTS_EARN,
            Scope.TIERS_READ,
            Scope.REWARDS_READ,
            Scope.REWARDS_CLAIM,
            Scope.WEBHOOKS_READ,
            Scope.WEBHOOKS_WRITE,
            Scope.LEADS_READ,
            Scope.LEADS_WRITE,
            Scope.ACTIVITIES_READ,
            Scope.ACTIVITIES_WRITE,
        }
    ),
}
