"""The permission matrix in the README is the one the application enforces: every route's
scopes, every role's scopes, and a request to every route with a key of every role."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from memberhub.auth.dependencies import RequireScope
from memberhub.auth.roles import ROLE_SCOPES, Role
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.leads.test_leads import LEADS, create_lead
from tests.support import ApiClient

README = Path(__file__).resolve().parents[2] / "README.md"
SCOPE = re.compile(r"`([a-z_]+:[a-z]+)`")


def _matrix_section() -> str:
    text = README.read_text()
    start = text.index("## Permission matrix")
    return text[start : text.index("\n## ", start + 1)]


def documented_role_scopes() -> dict[str, set[str]]:
    rows = [line for line in _matrix_section().splitlines() if line.startswith("| `")]
    header = next(line for line in _matrix_section().splitlines() if line.startswith("| scope"))
    roles = [cell.strip(" `") for cell in header.strip("|").split("|")[1:]]
    granted: dict[str, set[str]] = {role: set() for role in roles}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) != len(roles) + 1:
            continue  # a route row
        for role, cell in zip(roles, cells[1:], strict=True):
            if cell == "yes":
                granted[role].add(cells[0].strip("`"))
    return granted


def documented_routes() -> dict[str, tuple[set[str], set[str]]]:
    """`METHOD path` -> (scopes always needed, scopes needed with an optional field)."""
    routes = {}
    for line in _matrix_section().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`") and " /" in cells[0]:
            always, _, conditional = cells[1].partition(";")
            routes[cells[0].strip("`")] = (
                set(SCOPE.findall(always)),
                set(SCOPE.findall(conditional)),
            )
    return routes


def _scopes(dependant: Dependant) -> set[str]:
    found = set()
    for dependency in dependant.dependencies:
        if isinstance(dependency.call, RequireScope):
            found.add(str(dependency.call.scope))
        found |= _scopes(dependency)
    return found


def enforced_routes(app: FastAPI) -> dict[str, set[str]]:
    return {
        f"{method} {route.path}": _scopes(route.dependant)
        for route in app.router.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods or ()
    }


def test_the_readme_documents_every_roles_scopes() -> None:
    documented = documented_role_scopes()
    assert documented == {
        role.value: {str(scope) for scope in scopes} for role, scopes in ROLE_SCOPES.items()
    }


def test_the_readme_documents_every_route_with_its_scopes(app: FastAPI) -> None:
    documented = {route: always for route, (always, _) in documented_routes().items()}
    assert documented == enforced_routes(app)


async def test_every_role_is_refused_exactly_the_routes_it_lacks_a_scope_for(
    app: FastAPI, http: httpx.AsyncClient, db: Database
) -> None:
    keys = {role: await issue_key(db, role) for role in Role}
    mismatches = []
    for route, scopes in sorted(enforced_routes(app).items()):
        if not scopes:
            continue
        method, path = route.split(" ", 1)
        url = re.sub(r"\{[a-z_]+\}", "xyz_missing", path)
        for role, key in keys.items():
            body: Any = {} if method in ("POST", "PATCH", "PUT") else None
            response = await http.request(
                method, url, json=body, headers={"Authorization": f"Bearer {key}"}
            )
            lacks = not scopes <= {str(s) for s in ROLE_SCOPES[role]}
            refused = response.status_code == 403
            if refused:
                assert response.json()["error"]["details"]["required_scope"] in scopes
            if lacks != refused:
                mismatches.append(f"{route} as {role.value}: {response.status_code}")
    assert mismatches == []


async def test_enrolling_a_lead_into_a_plan_needs_memberships_write(
    api: ApiClient, db: Database
) -> None:
    conditional = documented_routes()["POST /api/v1/leads/{lead_id}/enroll"][1]
    assert conditional == {"memberships:write"}
    plan = await api.create_plan()
    lead = await create_lead(api)
    agent = api.with_key(await issue_key(db, Role.SUPPORT_AGENT))
    refused = await agent.post(f"{LEADS}/{lead['id']}/enroll", {"plan_id": plan["id"]})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["details"]["required_scope"] == "memberships:write"
    unchanged = (await api.get(f"{LEADS}/{lead['id']}")).json()
    assert (unchanged["status"], unchanged["member_id"]) == (lead["status"], None)
    assert (await api.get("/api/v1/members")).json()["data"] == []
    enrolled = await agent.post(f"{LEADS}/{lead['id']}/enroll", {})
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["plan_id"] is None
