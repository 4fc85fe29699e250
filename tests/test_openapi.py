"""The OpenAPI description: short operation ids, a description on every operation, the
headers the API uses, and only the error statuses an operation can answer."""

from __future__ import annotations

import re
from typing import Any

import httpx

from memberhub.kit.types import Input


async def _spec(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, ops in spec["paths"].items() for m, op in ops.items()]


async def test_every_operation_has_a_short_unique_id_and_a_description(
    http: httpx.AsyncClient,
) -> None:
    operations = _operations(await _spec(http))
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids))
    assert [i for i in ids if not re.fullmatch(r"[a-z]+(?:[A-Z0-9][a-z0-9]*)*", i)] == []
    assert [f"{m} {p}" for p, m, op in operations if not op.get("description")] == []
    assert "createMember" in ids


async def test_the_headers_the_api_uses_are_declared(http: httpx.AsyncClient) -> None:
    spec = await _spec(http)
    create = spec["paths"]["/api/v1/members"]["post"]
    assert "Idempotency-Key" in [p["name"] for p in create["parameters"] if p["in"] == "header"]
    created = create["responses"]["201"]["headers"]
    assert {"Location", "ETag", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= set(
        created
    )
    assert "Retry-After" in create["responses"]["429"]["headers"]
    for path, method, op in _operations(spec):
        if "security" in op:
            ok = [s for s in op["responses"] if s.startswith("2")]
            assert all("RateLimit-Remaining" in op["responses"][s]["headers"] for s in ok), path
            if method == "post":
                assert any(p["name"] == "Idempotency-Key" for p in op["parameters"]), path


async def test_operations_declare_only_the_errors_they_can_answer(
    http: httpx.AsyncClient,
) -> None:
    spec = await _spec(http)
    plans = spec["paths"]["/api/v1/plans"]["get"]["responses"]
    assert set(plans) == {"200", "401", "403", "422", "429"}
    assert "409" not in spec["paths"]["/api/v1/members/{member_id}"]["get"]["responses"]
    assert {"400", "404", "409", "413"} <= set(
        spec["paths"]["/api/v1/members"]["post"]["responses"]
    )
    assert "401" not in spec["paths"]["/health"]["get"]["responses"]


async def test_request_body_examples_are_valid_requests(http: httpx.AsyncClient) -> None:
    spec = await _spec(http)
    components = spec["components"]["schemas"]
    with_examples = {
        name: schema["examples"] for name, schema in components.items() if "examples" in schema
    }
    assert {"MemberCreate", "AwardRequest", "PlanCreate", "EndpointCreate"} <= set(with_examples)
    models = {model.__name__: model for model in _input_models(Input)}
    for name, examples in with_examples.items():
        for example in examples:
            models[name].model_validate(example)  # raises when an example is not valid


def _input_models(base: type[Input]) -> list[type[Input]]:
    found = []
    for model in base.__subclasses__():
        found += [model, *_input_models(model)]
    return found
