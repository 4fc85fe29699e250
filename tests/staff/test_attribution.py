"""A staff user acts as `stf_…`, with the permissions of a key of the same role."""

from __future__ import annotations

from memberhub.approvals import service as approvals
from memberhub.auth.roles import ROLE_SCOPES, Role
from memberhub.kit.db import Database
from memberhub.members.service import get_member
from memberhub.organisations.repository import OrganisationRepository
from memberhub.points.schemas import DeductRequest
from memberhub.staff import service
from memberhub.staff.repository import StaffRepository
from tests.console.support import create_staff_user
from tests.support import ApiClient


async def test_a_staff_principal_has_its_roles_scopes_and_its_organisations_reach(
    api: ApiClient, db: Database
) -> None:
    hq = (await api.create_organisation())["id"]
    chapter = (await api.create_organisation(parent_id=hq))["id"]
    other = (await api.create_organisation())["id"]
    staff_id = await create_staff_user(db, role="support_agent", organisation=hq)
    async with db.transaction() as session:
        staff = await StaffRepository(session).get_by_public_id(staff_id)
        assert staff is not None
        principal = await service.principal_for(session, staff)
    assert principal.actor.id == staff_id
    assert principal.scopes == ROLE_SCOPES[Role.SUPPORT_AGENT]
    async with db.transaction(read_only=True) as session:
        repository = OrganisationRepository(session)
        chapter_row = await repository.get_by_public_id(chapter)
        other_row = await repository.get_by_public_id(other)
    assert chapter_row is not None
    assert other_row is not None
    assert principal.can_see_organisation(chapter_row.id)
    assert not principal.can_see_organisation(other_row.id)
    assert not principal.can_see_organisation(None)


async def test_an_approval_requested_by_a_staff_user_names_them(
    api: ApiClient, db: Database
) -> None:
    member = await api.create_member()
    awarded = await api.post(
        "/api/v1/points/award", {"member_id": member["id"], "points": 100, "reason": "x"}
    )
    assert awarded.status_code == 201, awarded.text
    staff_id = await create_staff_user(db, role="support_agent")
    async with db.transaction() as session:
        staff = await StaffRepository(session).get_by_public_id(staff_id)
        assert staff is not None
        principal = await service.principal_for(session, staff)
        target = await get_member(session, principal, member["id"])
        approval = await approvals.request_deduction(
            session,
            principal,
            target,
            DeductRequest(member_id=member["id"], points=60, reason="Duplicate award"),
        )
        assert approval.requested_by == staff_id
    listed = (await api.get("/api/v1/approvals")).json()["data"]
    assert [a["requested_by"] for a in listed] == [staff_id]
