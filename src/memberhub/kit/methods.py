"""Which methods a path allows, over every route that serves it.

Starlette answers a method a path does not serve with the `Allow` of the first route it met,
and lets a route with a path parameter take a request meant for a fixed path
(`PATCH /rewards/claims` reached `PATCH /rewards/{reward_id}` and was a 422). Here the most
specific routes matching a path (those with the fewest parameters) decide: `OPTIONS` is
answered 204 with their methods, and any other method they do not serve is a 405 with the
full `Allow`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from memberhub.kit.http import error_response

_PARAMETER = re.compile(r"\{[^}]+\}")


@dataclass(frozen=True)
class _Template:
    pattern: re.Pattern[str]
    parameters: int
    methods: frozenset[str]


class MethodTable:
    def __init__(self, routes: tuple[tuple[str, re.Pattern[str], frozenset[str]], ...]) -> None:
        """`routes`: (path, path regex, methods) of every route that names its methods."""
        methods_by_path: dict[str, set[str]] = {}
        patterns: dict[str, re.Pattern[str]] = {}
        for path, pattern, methods in routes:
            methods_by_path.setdefault(path, set()).update(methods)
            patterns[path] = pattern
        self.templates = [
            _Template(patterns[path], len(_PARAMETER.findall(path)), frozenset(methods))
            for path, methods in methods_by_path.items()
        ]
        parameterised = [t.pattern for t in self.templates if t.parameters]
        # Fixed paths a parameterised route could take a request for: only these (and
        # OPTIONS) need a look before routing.
        self.shadowed = frozenset(
            path
            for path in methods_by_path
            if not _PARAMETER.search(path) and any(p.match(path) for p in parameterised)
        )

    def allowed(self, path: str) -> frozenset[str] | None:
        """The methods of the most specific routes serving `path`; None when none does."""
        matching = [t for t in self.templates if t.pattern.match(path)]
        if not matching:
            return None
        fewest = min(t.parameters for t in matching)
        allowed: set[str] = set()
        for template in matching:
            if template.parameters == fewest:
                allowed |= template.methods
        return frozenset(allowed | {"OPTIONS"})


def allow_header(methods: frozenset[str]) -> str:
    return ", ".join(sorted(methods))


def method_table(app: Any) -> MethodTable:
    """The application's table, built from its routes on first use."""
    table: MethodTable | None = getattr(app.state, "method_table", None)
    if table is None:
        routes = tuple(
            (route.path, route.path_regex, frozenset(route.methods))
            for route in app.router.routes
            if isinstance(route, Route) and route.methods
        )
        table = app.state.method_table = _table_of(routes)
    return table


@functools.lru_cache(maxsize=8)
def _table_of(routes: tuple[tuple[str, re.Pattern[str], frozenset[str]], ...]) -> MethodTable:
    """Tables shared by applications with the same routes (matching every fixed path against
    every template is most of the cost of a new application)."""
    return MethodTable(routes)


class MethodsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        table = method_table(scope["app"])
        path, method = scope["path"], scope["method"]
        if method == "OPTIONS" or path in table.shadowed:
            allowed = table.allowed(path)
            if allowed is not None and (method == "OPTIONS" or method not in allowed):
                await _answer(scope, receive, send, method, allowed)
                return
        await self.app(scope, receive, send)


async def _answer(
    scope: Scope, receive: Receive, send: Send, method: str, allowed: frozenset[str]
) -> None:
    headers = {"Allow": allow_header(allowed)}
    if method == "OPTIONS":
        await Response(status_code=204, headers=headers)(scope, receive, send)
        return
    response = error_response(
        405, "METHOD_NOT_ALLOWED", f"{method} is not allowed here.", headers=headers
    )
    await response(scope, receive, send)
