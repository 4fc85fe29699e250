"""The OpenAPI description, refined after FastAPI builds it: the headers the API uses
(`Idempotency-Key`, `RateLimit-*`, `Retry-After`, `Location`, `ETag`), for each
operation only the error statuses it can answer, and maps whose keys have a pattern
refusing other keys, as the API does."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from memberhub.kit.http import ErrorBody, error_doc

_INTEGER = {"schema": {"type": "integer"}}
RATE_LIMIT_HEADERS = {
    "RateLimit-Limit": {"description": "Requests the key may make per window.", **_INTEGER},
    "RateLimit-Remaining": {"description": "Requests left in this window.", **_INTEGER},
    "RateLimit-Reset": {"description": "Seconds until the window resets.", **_INTEGER},
}
RETRY_AFTER = {"description": "Seconds to wait before trying again.", **_INTEGER}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Send the same key with the same body within 24 hours to get the first "
    "response again (with `Idempotent-Replayed: true`) instead of doing it twice.",
    # Printable ASCII: what every client sends in a header, and the app takes.
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
}
# Routes that take no API key: providers' webhooks, OAuth callbacks.
_PUBLIC_PREFIXES = ("/api/v1/inbound/", "/api/v1/integrations/{integration_id}/oauth/callback")


def _sets_header(route: APIRoute, header: str) -> bool:
    try:
        source = inspect.getsource(route.endpoint)
    except (OSError, TypeError):
        return False
    return f'headers["{header}"]' in source


def refine(schema: dict[str, Any], routes: list[Any]) -> dict[str, Any]:
    by_operation = {
        (route.path, method.lower()): route
        for route in routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods or ()
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            route = by_operation.get((path, method))
            if route is None:
                continue
            _refine_operation(path, method, operation, route)
    _add_error_body(schema)
    _close_patterned_maps(schema)
    return schema


def _add_error_body(schema: dict[str, Any]) -> None:
    """The schema of `ErrorBody`, which error responses name by reference (`error_doc`)."""
    described = ErrorBody.model_json_schema(
        ref_template="#/components/schemas/{model}", mode="serialization"
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in described.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(ErrorBody.__name__, described)


def _close_patterned_maps(node: Any) -> None:
    """A map typed `dict[Key, Value]` with a constrained key is described with
    `patternProperties`, which leaves keys matching no pattern allowed; the API refuses them."""
    if isinstance(node, dict):
        if "patternProperties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _close_patterned_maps(value)
    elif isinstance(node, list):
        for value in node:
            _close_patterned_maps(value)


def _refine_operation(path: str, method: str, operation: dict[str, Any], route: APIRoute) -> None:
    responses: dict[str, Any] = operation["responses"]
    public = path.startswith(_PUBLIC_PREFIXES)
    authenticated = "security" in operation
    has_body = "requestBody" in operation
    path_ids = "{" in path
    query_ids = any(
        p.get("in") == "query" and p["name"].endswith(("_id", "_for"))  # ids to look up
        for p in operation.get("parameters", [])
    )
    keep = {"422"}
    if public:
        keep |= {"400", "401", "404", "409", "413"}
    if authenticated:
        keep |= {"401", "403", "429"}
    if path_ids or query_ids or has_body:
        keep.add("404")
    if has_body:
        keep.add("400")  # a body that is not JSON
    if method != "get":
        keep.add("409")
    for status in [s for s in responses if s[0] in "45" and s not in keep]:
        if status != "412" or method == "get":
            del responses[status]
    if has_body or (public and method == "post"):
        responses.setdefault("413", error_doc("The body is larger than the configured limit"))
    if authenticated:
        for status, response in responses.items():
            if status.startswith("2"):
                response.setdefault("headers", {}).update(RATE_LIMIT_HEADERS)
        if "429" in responses:
            responses["429"].setdefault("headers", {}).update(
                {"Retry-After": RETRY_AFTER, **RATE_LIMIT_HEADERS}
            )
        if method == "post":
            operation.setdefault("parameters", []).append(IDEMPOTENCY_KEY)
    for status, response in responses.items():
        if not status.startswith("2"):
            continue
        headers = response.setdefault("headers", {})
        if status == "201" and _sets_header(route, "Location"):
            headers["Location"] = {
                "description": "Where the created object is.",
                "schema": {"type": "string"},
            }
        if _sets_header(route, "ETag"):
            headers["ETag"] = {
                "description": "The object's version; send it as `If-Match` to change only it.",
                "schema": {"type": "string"},
            }
        if not headers:
            del response["headers"]


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            app.openapi_schema = refine(schema, app.router.routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
