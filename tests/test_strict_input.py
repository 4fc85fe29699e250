"""Input is taken as typed: no integer from `true`, `"100"` or `1.0`, no boolean from 0, no
time from a number; unknown query parameters are refused; members are found by external id."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import ApiClient


@pytest.mark.parametrize("points", [True, "100", 1.0, [1], {"n": 1}])
async def test_an_award_takes_only_a_json_integer(api: ApiClient, points: Any) -> None:
    member = await api.create_member()
    body = {"member_id": member["id"], "points": points, "reason": "typed"}
    response = await api.post("/api/v1/points/award", body)
    assert response.status_code == 422, response.text
    fields = response.json()["error"]["details"]["fields"]
    assert fields[0]["loc"] == ["body", "points"]
    balance = await api.get(f"/api/v1/members/{member['id']}/points/balance")
    assert balance.json()["current_balance"] == 0


async def test_a_boolean_field_takes_only_true_or_false(api: ApiClient) -> None:
    response = await api.post(
        "/api/v1/members", {"email": "a@example.com", "consent": {"email": 0}}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["fields"][0]["loc"] == ["body", "consent", "email"]
    plan = await api.create_plan()
    patched = await api.patch(f"/api/v1/plans/{plan['id']}", {"active": 0})
    assert patched.status_code == 422, patched.text
    assert (await api.get(f"/api/v1/plans/{plan['id']}")).json()["active"] is True
    fine = await api.post("/api/v1/members", {"email": "a@example.com", "consent": {"email": True}})
    assert fine.status_code == 201, fine.text


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/analytics/kpis", {"as_of": "0.5"}),
        ("/api/v1/external/leads/export", {"date_from": "0"}),
        ("/api/v1/members", {"updated_since": "1700000000"}),
    ],
)
async def test_a_time_is_an_iso_8601_string_not_a_number(
    api: ApiClient, path: str, params: dict[str, str]
) -> None:
    response = await api.get(path, params=params)
    assert response.status_code == 422, response.text
    assert "ISO 8601" in response.text


async def test_unknown_query_parameters_are_refused(api: ApiClient) -> None:
    await api.create_member()
    response = await api.get("/api/v1/members", params={"externalid": "crm:1"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["unknown"] == ["externalid"]
    assert (await api.get("/api/v1/members", params={"limit": 5})).status_code == 200


async def test_a_one_value_filter_given_twice_is_refused_and_a_list_filter_is_not(
    api: ApiClient,
) -> None:
    member = await api.create_member()
    award = {"member_id": member["id"], "points": 10, "reason": "r"}
    assert (await api.post("/api/v1/points/award", award)).status_code == 201
    for path, params in (
        ("/api/v1/members", [("status", "active"), ("status", "pending")]),
        (f"/api/v1/members/{member['id']}/points/batches", [("status", "active")] * 2),
    ):
        response = await api.get(path, params=params)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "VALIDATION_ERROR"
        assert error["details"] == {"repeated": ["status"]}
        assert "given more than once: status" in error["message"]
    both = await api.get("/api/v1/points/transactions", params={"type": ["award", "redeem"]})
    assert both.status_code == 200, both.text
    assert [txn["type"] for txn in both.json()["data"]] == ["award"]


async def test_query_values_are_taken_as_typed(api: ApiClient) -> None:
    for path, name, bad, good in (
        ("/api/v1/members", "limit", "1.0", "1"),
        ("/api/v1/members", "limit", "+1", "2"),
        ("/api/v1/rewards", "active", "0", "false"),
        ("/api/v1/rewards", "active", "yes", "true"),
        ("/api/v1/earning-rules", "archived", "on", "true"),
        ("/api/v1/earning-rules", "archived", "1", "True"),
    ):
        refused = await api.get(path, params={name: bad})
        assert refused.status_code == 422, (path, name, bad, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "VALIDATION_ERROR"
        (field,) = error["details"]["fields"]
        assert field["loc"] == ["query", name]
        assert field["type"] in ("bool_parsing", "int_parsing")
        assert (await api.get(path, params={name: good})).status_code == 200


async def test_members_are_found_by_external_id(api: ApiClient) -> None:
    ana = await api.create_member(external_ids={"crm": "42", "erp": "A-1"})
    await api.create_member(external_ids={"crm": "43"})
    await api.create_member(external_ids={"erp": "42"})
    found = await api.get("/api/v1/members", params={"external_id": "crm:42"})
    assert found.status_code == 200, found.text
    assert [m["id"] for m in found.json()["data"]] == [ana["id"]]
    colon = await api.create_member(external_ids={"web": "a:b"})
    by_colon = await api.get("/api/v1/members", params={"external_id": "web:a:b"})
    assert [m["id"] for m in by_colon.json()["data"]] == [colon["id"]]
    assert (await api.get("/api/v1/members", params={"external_id": "crm"})).status_code == 422


@pytest.mark.parametrize(
    "body",
    [b'{"email": "a@example.com', b'{"email": "\xff\xfe@example.com"}', b"[" * 100_000],
    ids=["truncated", "not-utf-8", "nested-too-deep"],
)
async def test_a_body_that_is_not_readable_json_is_one_422_shape(
    api: ApiClient, body: bytes
) -> None:
    response = await api.http.post(
        "/api/v1/members",
        content=body,
        headers={"Authorization": f"Bearer {api.key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    [field] = error["details"]["fields"]
    assert (field["loc"][0], field["type"]) == ("body", "json_invalid")


async def test_a_body_naming_a_key_twice_is_refused_and_changes_nothing(api: ApiClient) -> None:
    headers = {"Authorization": f"Bearer {api.key}", "Content-Type": "application/json"}
    for body in (
        b'{"email": "d@example.com", "email": "e@example.com"}',
        b'{"email": "d@example.com", "custom_fields": {"size": 1, "size": 2}}',
    ):
        refused = await api.http.post("/api/v1/members", content=body, headers=headers)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "VALIDATION_ERROR"
        assert [field["type"] for field in error["details"]["fields"]] == ["duplicate_key"]
        assert error["details"]["fields"][0]["loc"][0] == "body"
    assert (await api.get("/api/v1/members")).json()["data"] == []
    once = b'{"email": "d@example.com", "custom_fields": {"size": 1}}'
    assert (
        await api.http.post("/api/v1/members", content=once, headers=headers)
    ).status_code == 201
