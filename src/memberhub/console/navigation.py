"""The console's navigation: one entry per page, shown to those whose role can use it.
A new page adds its entry here."""

from __future__ import annotations

from dataclasses import dataclass

from memberhub.auth.principal import Principal
from memberhub.auth.roles import Scope


@dataclass(frozen=True)
class NavItem:
    path: str
    label: str
    scope: Scope | None = None


NAVIGATION: list[NavItem] = [
    NavItem("/console", "Home"),
    NavItem("/console/members", "Members", Scope.MEMBERS_READ),
    NavItem("/console/approvals", "Approvals", Scope.APPROVALS_READ),
    NavItem("/console/alerts", "Alerts", Scope.ALERTS_READ),
    NavItem("/console/analytics", "Analytics", Scope.ANALYTICS_READ),
    NavItem("/console/integrations", "Integrations", Scope.INTEGRATIONS_READ),
    NavItem("/console/staff", "Staff", Scope.STAFF_READ),
    NavItem("/console/keys", "API keys", Scope.API_KEYS_READ),
    NavItem("/console/webhooks", "Webhooks", Scope.WEBHOOKS_READ),
    NavItem("/console/bulk-awards", "Bulk awards", Scope.POINTS_BULK),
    NavItem("/console/account", "Account"),
]


def visible_navigation(principal: Principal) -> list[NavItem]:
    return [item for item in NAVIGATION if item.scope is None or item.scope in principal.scopes]
