"""Organisations through the HTTP API: HQs and chapters, slugs, deletion rules, bound keys."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from memberhub.auth.roles import Role
from memberhub.kit.db import Base, Database
from memberhub.organisations.service import ID_COPIES
from tests.conftest import issue_key
from tests.support import ApiClient

ORGS = "/api/v1/organisations"


async def list_ids(client: ApiClient, **params: Any) -> list[str]:
    response = await client.get(ORGS, params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return [org["id"] for org in response.json()["data"]]


async def bound_client(
    http: httpx.AsyncClient, db: Database, organisation_id: str, role: Role = Role.ADMIN
) -> ApiClient:
    return ApiClient(http, await issue_key(db, role, organisation=organisation_id))


# ---------------------------------------------------------------- CRUD


async def test_an_organisation_without_a_parent_is_an_hq(api: ApiClient) -> None:
    response = await api.post(ORGS, {"name": "Institute HQ", "slug": "institute"})
    assert response.status_code == 201, response.text
    hq = response.json()
    assert hq["id"].startswith("org_")
    assert hq["name"] == "Institute HQ"
    assert hq["slug"] == "institute"
    assert hq["kind"] == "hq"
    assert hq["parent_id"] is None
    assert (await api.get(f"{ORGS}/{hq['id']}")).json() == hq
    assert await list_ids(api) == [hq["id"]]


async def test_an_organisation_under_an_hq_is_a_chapter_of_it(api: ApiClient) -> None:
    hq = await api.create_organisation()
    north = await api.create_organisation(parent_id=hq["id"], slug="north")
    south = await api.create_organisation(parent_id=hq["id"], slug="south")
    assert north["kind"] == south["kind"] == "chapter"
    assert north["parent_id"] == south["parent_id"] == hq["id"]
    assert (await api.get(f"{ORGS}/{north['id']}")).json()["parent_id"] == hq["id"]


async def test_the_list_can_be_narrowed_to_the_chapters_of_a_parent(api: ApiClient) -> None:
    hq = await api.create_organisation()
    other_hq = await api.create_organisation()
    north = await api.create_organisation(parent_id=hq["id"])
    south = await api.create_organisation(parent_id=hq["id"])
    await api.create_organisation(parent_id=other_hq["id"])

    assert await list_ids(api, parent_id=hq["id"]) == [north["id"], south["id"]]
    assert len(await list_ids(api)) == 5


async def test_a_chapter_of_an_unknown_parent_is_404(api: ApiClient) -> None:
    response = await api.post(
        ORGS, {"name": "Lost", "slug": "lost", "parent_id": "org_doesnotexist"}
    )
    assert response.status_code == 404
    assert await list_ids(api) == []


async def test_patch_renames_and_reslugs(api: ApiClient) -> None:
    org = await api.create_organisation(name="Old Name", slug="old-slug")
    response = await api.patch(f"{ORGS}/{org['id']}", {"name": "New Name", "slug": "new-slug"})
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched["name"] == "New Name"
    assert patched["slug"] == "new-slug"
    assert patched["kind"] == org["kind"]
    assert (await api.get(f"{ORGS}/{org['id']}")).json() == patched


async def test_patch_keeping_the_same_slug_is_allowed(api: ApiClient) -> None:
    org = await api.create_organisation(slug="same")
    response = await api.patch(f"{ORGS}/{org['id']}", {"slug": "same", "name": "Renamed"})
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "Renamed"


async def test_the_parent_cannot_be_changed_by_patch(api: ApiClient) -> None:
    hq = await api.create_organisation()
    org = await api.create_organisation()
    response = await api.patch(f"{ORGS}/{org['id']}", {"parent_id": hq["id"]})
    assert response.status_code == 422
    assert (await api.get(f"{ORGS}/{org['id']}")).json()["parent_id"] is None


async def test_an_organisation_without_chapters_or_members_can_be_deleted(
    api: ApiClient,
) -> None:
    hq = await api.create_organisation()
    chapter = await api.create_organisation(parent_id=hq["id"])
    response = await api.delete(f"{ORGS}/{chapter['id']}")
    assert response.status_code == 204
    assert (await api.get(f"{ORGS}/{chapter['id']}")).status_code == 404
    assert (await api.delete(f"{ORGS}/{hq['id']}")).status_code == 204
    assert await list_ids(api) == []


async def test_unknown_organisations_are_404(api: ApiClient) -> None:
    assert (await api.get(f"{ORGS}/org_doesnotexist")).status_code == 404
    assert (await api.patch(f"{ORGS}/org_doesnotexist", {"name": "X"})).status_code == 404
    assert (await api.delete(f"{ORGS}/org_doesnotexist")).status_code == 404


# ---------------------------------------------------------------- slugs and validation


async def test_a_taken_slug_is_409(api: ApiClient) -> None:
    hq = await api.create_organisation(slug="taken")
    response = await api.post(ORGS, {"name": "Again", "slug": "taken"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "DUPLICATE_SLUG"
    # Slugs are unique across the installation, chapters included.
    chapter = await api.post(ORGS, {"name": "Again", "slug": "taken", "parent_id": hq["id"]})
    assert chapter.status_code == 409
    assert await list_ids(api) == [hq["id"]]


async def test_patching_to_a_taken_slug_is_409_and_changes_nothing(api: ApiClient) -> None:
    await api.create_organisation(slug="first")
    second = await api.create_organisation(slug="second", name="Second")
    response = await api.patch(f"{ORGS}/{second['id']}", {"slug": "first", "name": "Changed"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "DUPLICATE_SLUG"
    assert (await api.get(f"{ORGS}/{second['id']}")).json() == second


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "X", "slug": "Upper"}, "slug"),
        ({"name": "X", "slug": "-leading"}, "slug"),
        ({"name": "X", "slug": "trailing-"}, "slug"),
        ({"name": "X", "slug": "has space"}, "slug"),
        ({"name": "X", "slug": "a" * 101}, "slug"),
        ({"name": "X", "slug": ""}, "slug"),
        ({"name": "", "slug": "ok"}, "name"),
        ({"name": "   ", "slug": "ok"}, "name"),
        ({"slug": "ok"}, "name"),
        ({"name": "X", "slug": "ok", "kind": "hq"}, "kind"),
    ],
    ids=[
        "upper-case",
        "leading-dash",
        "trailing-dash",
        "space",
        "too-long",
        "empty-slug",
        "empty-name",
        "blank-name",
        "missing-name",
        "unknown-field",
    ],
)
async def test_invalid_organisations_are_422_naming_the_field(
    api: ApiClient, body: dict[str, Any], field: str
) -> None:
    response = await api.post(ORGS, body)
    assert response.status_code == 422, response.text
    fields = response.json()["error"]["details"]["fields"]
    assert any(f["loc"][:2] == ["body", field] for f in fields), fields
    assert await list_ids(api) == []


# ---------------------------------------------------------------- deletion rules


async def test_an_organisation_with_chapters_cannot_be_deleted(api: ApiClient) -> None:
    hq = await api.create_organisation()
    await api.create_organisation(parent_id=hq["id"])
    response = await api.delete(f"{ORGS}/{hq['id']}")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "ORGANISATION_HAS_CHAPTERS"
    assert (await api.get(f"{ORGS}/{hq['id']}")).status_code == 200


async def test_an_organisation_with_members_cannot_be_deleted(api: ApiClient) -> None:
    org = await api.create_organisation()
    await api.create_member(organisation_id=org["id"])
    response = await api.delete(f"{ORGS}/{org['id']}")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "ORGANISATION_IN_USE"
    assert (await api.get(f"{ORGS}/{org['id']}")).status_code == 200


async def test_an_organisation_with_leads_says_so_when_refused(api: ApiClient) -> None:
    org = await api.create_organisation()
    lead = await api.post("/api/v1/leads", {"email": "l@example.com", "organisation_id": org["id"]})
    assert lead.status_code == 201, lead.text
    response = await api.delete(f"{ORGS}/{org['id']}")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "ORGANISATION_IN_USE"
    assert error["details"]["leads"] == 1
    assert "leads (1)" in error["message"]
    assert (await api.get(f"{ORGS}/{org['id']}")).status_code == 200


async def test_an_organisation_with_api_keys_cannot_be_deleted(
    api: ApiClient, db: Database
) -> None:
    org = await api.create_organisation()
    await issue_key(db, Role.MANAGER, organisation=org["id"])
    response = await api.delete(f"{ORGS}/{org['id']}")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "ORGANISATION_IN_USE"


# ---------------------------------------------------------------- keys bound to an organisation


async def test_a_chapter_bound_key_cannot_create_an_hq(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    hq = await api.create_organisation()
    chapter = await api.create_organisation(parent_id=hq["id"])
    client = await bound_client(http, db, chapter["id"])
    response = await client.post(ORGS, {"name": "Rogue HQ", "slug": "rogue"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "FORBIDDEN"
    assert "rogue" not in {org["slug"] for org in (await api.get(ORGS)).json()["data"]}


async def test_an_hq_bound_key_creates_chapters_only_under_its_own_hq(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    hq = await api.create_organisation()
    other_hq = await api.create_organisation()
    client = await bound_client(http, db, hq["id"])

    assert (await client.post(ORGS, {"name": "HQ", "slug": "new-hq"})).status_code == 403
    own = await client.post(ORGS, {"name": "North", "slug": "north", "parent_id": hq["id"]})
    assert own.status_code == 201, own.text
    assert own.json()["parent_id"] == hq["id"]
    foreign = await client.post(
        ORGS, {"name": "South", "slug": "south", "parent_id": other_hq["id"]}
    )
    assert foreign.status_code == 404


async def test_a_bound_key_sees_only_its_organisation_and_chapters(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    hq = await api.create_organisation()
    north = await api.create_organisation(parent_id=hq["id"])
    south = await api.create_organisation(parent_id=hq["id"])
    other_hq = await api.create_organisation()

    hq_client = await bound_client(http, db, hq["id"], Role.MANAGER)
    assert await list_ids(hq_client) == [hq["id"], north["id"], south["id"]]
    assert (await hq_client.get(f"{ORGS}/{other_hq['id']}")).status_code == 404

    north_client = await bound_client(http, db, north["id"], Role.MANAGER)
    assert await list_ids(north_client) == [north["id"]]
    assert (await north_client.get(f"{ORGS}/{hq['id']}")).status_code == 404
    assert (await north_client.get(f"{ORGS}/{south['id']}")).status_code == 404


async def test_a_key_cannot_delete_the_organisation_it_is_bound_to(
    api: ApiClient, http: httpx.AsyncClient, db: Database
) -> None:
    org = await api.create_organisation()
    client = await bound_client(http, db, org["id"])
    response = await client.delete(f"{ORGS}/{org['id']}")
    assert response.status_code == 403
    assert (await api.get(f"{ORGS}/{org['id']}")).status_code == 200


@pytest.mark.parametrize("role", [Role.MANAGER, Role.SUPPORT_AGENT, Role.INTEGRATION])
async def test_only_admins_write_organisations(
    api: ApiClient, http: httpx.AsyncClient, db: Database, role: Role
) -> None:
    org = await api.create_organisation()
    client = ApiClient(http, await issue_key(db, role))
    assert (await client.get(f"{ORGS}/{org['id']}")).status_code == 200
    assert (await client.post(ORGS, {"name": "X", "slug": "x"})).status_code == 403
    assert (await client.patch(f"{ORGS}/{org['id']}", {"name": "X"})).status_code == 403
    assert (await client.delete(f"{ORGS}/{org['id']}")).status_code == 403


async def test_a_new_organisation_never_takes_a_deleted_ones_events_or_reference_ids(
    api: ApiClient, db: Database
) -> None:
    """The newest organisation deleted, the next one made (SQLite would give it the same
    id) starts clean: the old one's events and reference ids, kept without a key to it, are
    not the new one's."""
    old = await api.create_organisation()
    member = await api.create_member(organisation_id=old["id"])
    earn = {"member_id": member["id"], "amount": 1000, "currency": "MYR", "reference_id": "O-1"}
    assert (await api.post("/api/v1/points/earn", earn)).status_code == 201
    assert (await api.delete(f"/api/v1/members/{member['id']}")).status_code == 204
    assert (await api.delete(f"/api/v1/organisations/{old['id']}")).status_code == 204

    new = await api.create_organisation()
    newcomer = await api.create_member(organisation_id=new["id"])
    own = await api.post("/api/v1/points/earn", {**earn, "member_id": newcomer["id"]})
    assert own.status_code == 201, own.text
    bound = api.with_key(await issue_key(db, Role.ADMIN, organisation=new["id"]))
    events = await bound.get("/api/v1/events", {"limit": 500})
    assert events.status_code == 200, events.text
    assert member["id"] not in events.text
    assert newcomer["id"] in events.text


def test_every_column_keeping_an_organisation_id_without_a_key_is_known() -> None:
    """A column holding an organisation's id with no foreign key to it outlives the
    organisation: each is on the list an unused id is chosen against."""
    import memberhub.models  # noqa: F401 - every table in the metadata

    copies = {
        (table.name, column.name)
        for table in Base.metadata.sorted_tables
        for column in table.c
        if (column.name == "organisation_id" or column.name == "reference_scope")
        and not any(fk.column.table.name == "organisations" for fk in column.foreign_keys)
    }
    assert copies == set(ID_COPIES)


async def test_an_erased_member_enrolled_from_a_lead_does_not_keep_its_organisation_alive(
    api: ApiClient,
) -> None:
    org = await api.create_organisation()
    lead = await api.post("/api/v1/leads", {"email": "l@example.com", "organisation_id": org["id"]})
    assert lead.status_code == 201, lead.text
    enrolled = await api.post(f"/api/v1/leads/{lead.json()['id']}/enroll", {})
    assert enrolled.status_code == 201, enrolled.text
    member_id = enrolled.json()["member_id"]
    assert (await api.delete(f"/api/v1/members/{member_id}")).status_code == 204

    response = await api.delete(f"/api/v1/organisations/{org['id']}")
    assert response.status_code == 204, response.text
