from __future__ import annotations

from tests.support import ApiClient


async def test_member_can_be_created_and_listed(api: ApiClient) -> None:
    created = await api.create_member(first_name="Ana", last_name="Lim")
    assert created["id"].startswith("mem_")
    assert created["status"] == "pending"

    listed = await api.get("/api/v1/members")
    assert listed.status_code == 200
    assert [m["id"] for m in listed.json()["data"]] == [created["id"]]
