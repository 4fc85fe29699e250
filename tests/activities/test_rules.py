"""Earning rules over the API: versions kept and named by the transactions they produce,
archiving, and every kind of bad rule refused with the path of the problem and nothing
saved."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from memberhub.auth.roles import Role
from memberhub.earning_rules.conditions import Facts, compile_tree
from memberhub.kit.db import Database
from tests.activities.conftest import (
    RULES,
    activity_body,
    balance,
    create_rule,
    on_type,
    record,
    transactions,
)
from tests.conftest import issue_key
from tests.support import ApiClient


async def test_each_change_saves_a_version_and_transactions_name_theirs(api: ApiClient) -> None:
    member = await api.create_member()
    rule = await create_rule(api, name="Bookings", conditions=on_type("booking.completed"))
    assert rule["version"] == 1
    await record(api, activity_body(member))
    patched = await api.patch(
        f"{RULES}/{rule['id']}", {"effect": {"type": "fixed_points", "points": 250}}
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["version"] == 2
    unchanged = await api.patch(f"{RULES}/{rule['id']}", {"name": "Bookings"})
    assert unchanged.json()["version"] == 2
    await record(api, activity_body(member))
    earned = [
        (t["points"], t["details"]["rule_version"]) for t in await transactions(api, member["id"])
    ]
    assert earned == [(250, 2), (100, 1)]
    versions = (await api.get(f"{RULES}/{rule['id']}/versions")).json()["data"]
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[0]["definition"]["effect"] == {"type": "fixed_points", "points": 100}
    assert versions[1]["definition"]["effect"] == {"type": "fixed_points", "points": 250}
    assert versions[1]["definition"]["conditions"] == on_type("booking.completed")
    audit = (await api.get("/api/v1/audit", {"object_id": rule["id"]})).json()["data"]
    assert {entry["action"] for entry in audit} == {"earning_rule.create", "earning_rule.update"}


async def test_an_archived_or_inactive_rule_is_not_evaluated(api: ApiClient) -> None:
    member = await api.create_member()
    kept = await create_rule(api, name="kept", effect={"type": "fixed_points", "points": 1})
    paused = await create_rule(api, name="paused")
    gone = await create_rule(api, name="gone", effect={"type": "fixed_points", "points": 1000})
    assert (await api.patch(f"{RULES}/{paused['id']}", {"active": False})).status_code == 200
    assert (await api.delete(f"{RULES}/{gone['id']}")).status_code == 204
    await record(api, activity_body(member))
    assert await balance(api, member["id"]) == 1
    listed = (await api.get(RULES)).json()["data"]
    assert [r["id"] for r in listed] == [kept["id"], paused["id"]]
    archived = (await api.get(RULES, {"archived": "true"})).json()["data"]
    assert [r["id"] for r in archived] == [gone["id"]]
    refused = await api.patch(f"{RULES}/{gone['id']}", {"active": True})
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "EARNING_RULE_ARCHIVED"
    assert (await api.get(f"{RULES}/{gone['id']}")).json()["archived_at"] is not None


async def test_rules_are_changed_by_installation_keys_only(api: ApiClient, db: Database) -> None:
    organisation = (await api.create_organisation())["id"]
    bound = api.with_key(await issue_key(db, Role.ADMIN, organisation=organisation))
    body = {"name": "x", "effect": {"type": "fixed_points", "points": 1}}
    assert (await bound.post(RULES, body)).status_code == 403
    assert (await bound.get(RULES)).status_code == 200


def _amount_is(value: Any) -> dict[str, Any]:
    return {"field": "activity.attributes.amount", "op": "gte", "value": value}


@pytest.mark.parametrize(
    ("fields", "path", "problem"),
    [
        (
            {
                "conditions": {
                    "all": [
                        on_type("order.paid"),
                        _amount_is(100) | {"field": "activity.attributes.amout"},
                    ]
                }
            },
            "$.conditions.all[1].field",
            "unknown_field",
        ),
        (
            {"conditions": {"all": [_amount_is("100")]}},
            "$.conditions.all[0].value",
            "type_mismatch",
        ),
        (
            {
                "conditions": {
                    "any": [{"field": "member.status", "op": "in", "value": ["active", "gold"]}]
                }
            },
            "$.conditions.any[0].value[1]",
            "type_mismatch",
        ),
        (
            {"conditions": {"not": {"field": "activity.attributes.tags", "op": "gt", "value": 1}}},
            "$.conditions.not.op",
            "operator",
        ),
        (
            {"conditions": {"field": "activity.attributes.custom.vip", "op": "gt", "value": True}},
            "$.conditions.value",
            "type_mismatch",
        ),
        (
            {"conditions": {"field": "activity.type", "op": ["eq"], "value": "x"}},
            "$.conditions.op",
            "operator",
        ),
        (
            {"conditions": {"field": "activity.type", "op": {"a": 1}, "value": "x"}},
            "$.conditions.op",
            "operator",
        ),
        (
            {"conditions": {"field": "activity.occurred_at", "op": "gte", "value": "2026-01-01"}},
            "$.conditions.value",
            "type_mismatch",
        ),
        (
            {"conditions": {"field": "member.organisation_id", "op": "eq", "value": "org_missing"}},
            "$.conditions.value",
            "unknown_reference",
        ),
        ({"conditions": {"every": []}}, "$.conditions", "type"),
        (
            {
                "effect": {
                    "type": "points_per_amount",
                    "points": 1,
                    "per_amount": 100,
                    "currency": "MYR",
                }
            },
            "$.effect.max_points",
            "unbounded_effect",
        ),
        (
            {"effect": {"type": "multiplier", "percent": 200}},
            "$.effect.max_points",
            "unbounded_effect",
        ),
        ({"effect": {"type": "extend_expiry", "mode": "add"}}, "$.effect.days", "missing"),
        (
            {
                "effect": {"type": "extend_expiry"},
                "caps": {"per_member_per_day": {"points": 10}},
            },
            "$.caps.per_member_per_day.points",
            "not_applicable",
        ),
    ],
)
async def test_a_bad_rule_is_refused_with_the_path_of_the_problem(
    api: ApiClient, fields: dict[str, Any], path: str, problem: str
) -> None:
    body = {"name": "bad", "effect": {"type": "fixed_points", "points": 1}, **fields}
    response = await api.post(RULES, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert [(f["path"], f["type"]) for f in error["details"]["fields"]] == [(path, problem)]
    assert (await api.get(RULES)).json()["data"] == []


@pytest.mark.parametrize(
    ("condition", "path"),
    [
        ('{"field": "activity.type", "op": "eq", "value": "\\ud800"}', "$.conditions.value"),
        (
            '{"field": "activity.type", "op": "in", "value": ["a", "b\\udfff"]}',
            "$.conditions.value[1]",
        ),
        *(
            (f'{{"field": "{field}", "op": "gte", "value": 1{"0" * 400}}}', "$.conditions.value")
            for field in (
                "activity.attributes.amount",
                "activity.attributes.cpd_hours",
                "activity.attributes.custom.n",
            )
        ),
    ],
)
async def test_a_value_json_parses_to_what_no_condition_holds_is_refused(
    api: ApiClient, condition: str, path: str
) -> None:
    """JSON's `\\ud800` escape parses to text no database can hold, and an integer of 400
    digits to one no float holds: refused like any other value of the wrong type, not a
    server error."""
    body = (
        f'{{"name": "r", "conditions": {condition}, '
        '"effect": {"type": "fixed_points", "points": 1}}'
    )
    response = await api.http.post(
        RULES,
        content=body.encode(),
        headers={"Authorization": f"Bearer {api.key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    fields = response.json()["error"]["details"]["fields"]
    assert [(f["path"], f["type"]) for f in fields] == [(path, "type_mismatch")]
    assert (await api.get(RULES)).json()["data"] == []


async def test_every_problem_of_a_rule_is_named_at_once(api: ApiClient) -> None:
    conditions = {
        "all": [
            {"field": "activity.attributes.amount", "op": "eq", "value": "100"},
            {"field": "activity.kind", "op": "eq", "value": "x"},
        ]
    }
    body = {
        "name": "bad",
        "conditions": conditions,
        "effect": {"type": "multiplier", "percent": 150},
    }
    response = await api.post(RULES, body)
    assert response.status_code == 422, response.text
    paths = [f["path"] for f in response.json()["error"]["details"]["fields"]]
    assert paths == [
        "$.conditions.all[0].value",
        "$.conditions.all[1].field",
        "$.effect.max_points",
    ]


async def test_a_bad_change_is_refused_and_the_rule_keeps_its_version(api: ApiClient) -> None:
    rule = await create_rule(api)
    response = await api.patch(f"{RULES}/{rule['id']}", {"conditions": {"field": "member.tier"}})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"][0]["path"] == "$.conditions.op"
    for value in ("name", "effect"):
        assert (await api.patch(f"{RULES}/{rule['id']}", {value: None})).status_code == 422
    assert (await api.get(f"{RULES}/{rule['id']}")).json() == rule


async def test_an_effect_of_an_unknown_type_is_refused(api: ApiClient) -> None:
    response = await api.post(RULES, {"name": "x", "effect": {"type": "cashback", "points": 1}})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"][0]["loc"] == ["body", "effect"]


def test_a_fact_no_item_or_tag_carries_does_not_exist() -> None:
    """`exists` on an item part holds only when some item has it; an empty list of tags is
    no tags."""

    def facts(attributes: dict[str, Any]) -> Facts:
        return Facts(
            activity_type="order.paid",
            source="shop",
            occurred_at=datetime(2026, 12, 1, tzinfo=UTC),
            attributes=attributes,
            member_tier=None,
            member_status="active",
            member_organisation_id=None,
        )

    def holds(field: str, present: bool, attributes: dict[str, Any]) -> bool:
        tree = {"field": f"activity.attributes.{field}", "op": "exists", "value": present}
        return compile_tree(tree, {}).holds(facts(attributes))

    no_sku = {"items": [{"name": "gift wrap"}]}
    with_sku = {"items": [{"name": "gift wrap"}, {"sku": "SKU-1"}]}
    assert not holds("items.sku", True, no_sku)
    assert holds("items.sku", False, no_sku)
    assert holds("items.sku", True, with_sku)
    assert not holds("items.sku", False, with_sku)
    assert not holds("tags", True, {"tags": []})
    assert holds("tags", False, {"tags": []})
    assert holds("tags", True, {"tags": ["vip"]})
