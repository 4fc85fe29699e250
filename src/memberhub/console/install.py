"""Adding the console to the application."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from memberhub.console.pages import (
    account,
    alerts,
    analytics,
    approvals,
    auth,
    bulk_awards,
    home,
    integrations,
    keys,
    members,
    staff,
    webhooks,
)
from memberhub.console.session import ConsoleMiddleware
from memberhub.console.web import install_html_errors

PAGE_ROUTERS: tuple[APIRouter, ...] = (
    home.router,
    home.static_router,
    auth.router,
    account.router,
    members.router,
    approvals.router,
    alerts.router,
    analytics.router,
    integrations.router,
    staff.router,
    keys.router,
    webhooks.router,
    bulk_awards.router,
)


def install_console(app: FastAPI) -> None:
    """The console's pages, its session and security headers, and HTML error pages for it.
    Called after the API's error handlers are installed (it wraps them)."""
    app.add_middleware(ConsoleMiddleware)
    for router in PAGE_ROUTERS:
        app.router.routes.extend(router.routes)
    install_html_errors(app)
