"""The OpenAPI description: short operation ids, a description on every operation, the
headers the API uses, only the error statuses an operation can answer, and request schemas
that admit no request the API refuses for its form (null for a field it cannot clear, a map
key outside its pattern, text with a NUL)."""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter, ValidationError

from memberhub.app import create_app
from memberhub.kit.types import Input, LongText, Name, PatchInput, ShortText
from memberhub.settings import Settings
from tests.support import ApiClient


@functools.cache
def _described() -> dict[str, Any]:
    """The description, built once: it depends on the code alone (the application that
    builds it never connects to its database), and building it takes about a second."""
    app = create_app(
        Settings(database_url="postgresql+asyncpg://schema-only.invalid/none", log_level="WARNING")
    )
    return app.openapi()


def _spec() -> dict[str, Any]:
    return copy.deepcopy(_described())


async def test_the_api_serves_its_description(http: httpx.AsyncClient) -> None:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == _spec()


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, ops in spec["paths"].items() for m, op in ops.items()]


def test_every_operation_has_a_short_unique_id_and_a_description() -> None:
    operations = _operations(_spec())
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids))
    assert [i for i in ids if not re.fullmatch(r"[a-z]+(?:[A-Z0-9][a-z0-9]*)*", i)] == []
    assert [f"{m} {p}" for p, m, op in operations if not op.get("description")] == []
    assert "createMember" in ids


def test_the_headers_the_api_uses_are_declared() -> None:
    spec = _spec()
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


def test_operations_declare_only_the_errors_they_can_answer() -> None:
    spec = _spec()
    plans = spec["paths"]["/api/v1/plans"]["get"]["responses"]
    assert set(plans) == {"200", "401", "403", "422", "429"}
    assert "409" not in spec["paths"]["/api/v1/members/{member_id}"]["get"]["responses"]
    assert {"400", "404", "409", "413"} <= set(
        spec["paths"]["/api/v1/members"]["post"]["responses"]
    )
    assert "401" not in spec["paths"]["/health"]["get"]["responses"]


def test_request_body_examples_are_valid_requests() -> None:
    spec = _spec()
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


def _admits_null(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "null" or any(
        _admits_null(kind) for kind in schema.get("anyOf", [])
    )


def test_a_patch_field_documented_as_nullable_takes_null_and_the_others_are_not() -> None:
    components = _spec()["components"]["schemas"]
    patches = [
        model
        for model in _input_models(PatchInput)
        if issubclass(model, PatchInput) and model.__name__ in components
    ]
    assert {"ProgramPatch", "RewardPatch", "EndpointPatch", "IntegrationPatch"} <= {
        model.__name__ for model in patches
    }
    # Every PATCH body says which of its fields take null.
    bodies = {
        operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        for path in _spec()["paths"].values()
        for method, operation in path.items()
        if method == "patch" and "requestBody" in operation
    }
    assert bodies
    assert bodies <= {model.__name__ for model in patches}, bodies - {m.__name__ for m in patches}
    for model in patches:
        properties = components[model.__name__]["properties"]
        for name, schema in properties.items():
            if _admits_null(schema):
                model.model_validate({name: None})  # raises if the documented null is refused
            else:
                assert name in model.not_nullable, (model.__name__, name)
                with pytest.raises(ValidationError, match=f"{name} cannot be null"):
                    model.model_validate({name: None})
        assert set(model.not_nullable) <= set(properties), model.__name__


async def test_clearing_a_program_setting_it_always_has_is_refused_with_its_name(
    api: ApiClient,
) -> None:
    schema = _spec()["components"]["schemas"]["ProgramPatch"]
    assert schema["minProperties"] == 1  # an empty change is refused
    response = await api.patch("/api/v1/program", {"alert_thresholds": None})
    assert response.status_code == 422, response.text
    assert "alert_thresholds cannot be null" in response.text
    cleared = await api.patch("/api/v1/program", {"expiry_policy": "never", "expiry_days": None})
    assert cleared.status_code == 200, cleared.text


def _nodes(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        return [node, *(found for value in node.values() for found in _nodes(value))]
    if isinstance(node, list):
        return [found for value in node for found in _nodes(value)]
    return []


async def test_a_map_whose_keys_have_a_pattern_admits_no_other_key(api: ApiClient) -> None:
    spec = _spec()
    maps = [node for node in _nodes(spec) if "patternProperties" in node]
    assert maps
    assert [node for node in maps if node.get("additionalProperties") is not False] == []
    member = await api.create_member()
    refused = await api.patch(f"/api/v1/members/{member['id']}", {"custom_fields": {"a b": 1}})
    assert refused.status_code == 422, refused.text


@pytest.mark.parametrize("text_type", [Name, ShortText, LongText])
def test_text_refused_for_a_nul_is_documented_without_one(text_type: Any) -> None:
    adapter = TypeAdapter(text_type)
    documented = re.compile(adapter.json_schema()["pattern"])
    assert documented.fullmatch("Ana")
    assert adapter.validate_python("Ana") == "Ana"
    assert not documented.fullmatch("A\x00na")
    with pytest.raises(ValidationError, match="NUL"):
        adapter.validate_python("A\x00na")


async def test_the_documented_idempotency_key_is_one_the_api_takes(api: ApiClient) -> None:
    spec = _spec()
    header = next(
        p
        for p in spec["paths"]["/api/v1/members"]["post"]["parameters"]
        if p["name"] == "Idempotency-Key"
    )
    documented = re.compile(header["schema"]["pattern"])
    # A header arrives as Latin-1; the API takes a key of printable characters.
    admitted = [chr(c) for c in range(256) if documented.fullmatch(chr(c))]
    assert len(admitted) == 95
    assert all(c.isprintable() for c in admitted)
    response = await api.post(
        "/api/v1/members", {"email": "a@example.com"}, headers={"Idempotency-Key": " ~" * 127}
    )
    assert response.status_code == 201, response.text
