"""Methods a path does not serve: 405 with every method the path serves in `Allow`, never a
route with a path parameter taking a request meant for a fixed path; OPTIONS answers 204
with the same `Allow`."""

from __future__ import annotations

import re
from collections import defaultdict

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute

from tests.support import ApiClient

METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")


def served(app: FastAPI) -> dict[str, set[str]]:
    paths: dict[str, set[str]] = defaultdict(set)
    for route in app.router.routes:
        if isinstance(route, APIRoute):
            paths[route.path] |= route.methods or set()
    return paths


def concrete(path: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "xyz_1", path)


async def test_every_path_answers_options_and_other_methods_with_its_full_allow(
    app: FastAPI, http: httpx.AsyncClient, api: ApiClient
) -> None:
    problems = []
    paths = served(app)
    for path, methods in sorted(paths.items()):
        expected = ", ".join(sorted(methods | {"OPTIONS"}))
        url = concrete(path)
        options = await http.options(url)
        if (options.status_code, options.headers.get("allow")) != (204, expected):
            problems.append(f"OPTIONS {path}: {options.status_code} {options.headers}")
        for method in sorted(set(METHODS) - methods):
            response = await api.http.request(
                method, url, headers={"Authorization": f"Bearer {api.key}"}
            )
            if response.status_code != 405 or response.headers.get("allow") != expected:
                problems.append(
                    f"{method} {path}: {response.status_code} {response.headers.get('allow')}"
                )
            elif path.startswith("/console"):
                # The console answers with an HTML error page.
                if not response.headers["content-type"].startswith("text/html"):
                    problems.append(f"{method} {path}: {response.headers['content-type']}")
            elif response.json()["error"]["code"] != "METHOD_NOT_ALLOWED":
                problems.append(f"{method} {path}: {response.text}")
    assert problems == []


async def test_a_fixed_path_is_not_taken_by_a_route_with_a_parameter(api: ApiClient) -> None:
    patched = await api.patch("/api/v1/rewards/claims", {"name": "x"})
    assert patched.status_code == 405, patched.text
    assert patched.headers["allow"] == "GET, OPTIONS"
    deleted = await api.delete("/api/v1/tiers/assign")
    assert deleted.status_code == 405, deleted.text
    assert deleted.headers["allow"] == "OPTIONS, POST"
