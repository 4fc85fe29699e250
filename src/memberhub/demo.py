"""A realistic demo data set: an HQ with two chapters, three plans, members in all statuses."""

from __future__ import annotations

import random
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.auth.principal import Principal
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.errors import Conflict
from memberhub.members.models import MemberStatus
from memberhub.members.schemas import Consent, MemberCreate
from memberhub.members.service import create_member
from memberhub.memberships import service as memberships
from memberhub.memberships.schemas import PlanCreate
from memberhub.organisations.repository import OrganisationRepository
from memberhub.organisations.schemas import OrganisationCreate
from memberhub.organisations.service import create_organisation

FIRST_NAMES = [
    "Aisha", "Wei Ling", "Rajesh", "Siti", "Daniel", "Mei", "Arjun", "Nurul", "Jason", "Priya",
    "Hafiz", "Grace", "Kumar", "Farah", "Ethan", "Yuki", "Amir", "Chloe", "Vikram", "Lina",
]  # fmt: skip
LAST_NAMES = [
    "Tan", "Abdullah", "Lim", "Nair", "Wong", "Rahman", "Lee", "Singh", "Chong", "Ismail",
    "Ng", "Menon", "Ho", "Aziz", "Teo", "Pillai",
]  # fmt: skip

# How the members are spread over statuses (the remainder stays active).
STATUS_SHARE = {
    MemberStatus.PENDING: 0.10,
    MemberStatus.GRACE: 0.10,
    MemberStatus.LAPSED: 0.10,
    MemberStatus.SUSPENDED: 0.05,
    MemberStatus.CANCELLED: 0.05,
}


async def load_demo(session: AsyncSession, actor: Actor, *, members: int = 200) -> str:
    principal = Principal.system(actor)
    if await OrganisationRepository(session).get_by_slug("demo-hq") is not None:
        raise Conflict("The demo data set is already loaded (organisation slug 'demo-hq').")
    rng = random.Random(2026)
    hq = await create_organisation(
        session, principal, OrganisationCreate(name="Demo Institute HQ", slug="demo-hq")
    )
    chapters = [
        await create_organisation(
            session,
            principal,
            OrganisationCreate(name=f"Demo Institute {region}", slug=f"demo-{region.lower()}",
                               parent_id=hq.public_id),
        )
        for region in ("North", "South")
    ]  # fmt: skip
    plans = [
        await memberships.create_plan(session, principal, PlanCreate.model_validate(spec))
        for spec in (
            {"code": "DEMO-STANDARD", "name": "Standard", "term_months": 12,
             "price_amount": 24000, "currency": "MYR", "grace_days": 30},
            {"code": "DEMO-STUDENT", "name": "Student", "term_months": 12,
             "price_amount": 6000, "currency": "MYR", "grace_days": 14},
            {"code": "DEMO-CORPORATE", "name": "Corporate", "term_months": 24,
             "price_amount": 180000, "currency": "MYR", "grace_days": 60, "auto_renew": True},
        )
    ]  # fmt: skip
    organisations = [hq, *chapters]
    targets: list[str] = []
    for status, share in STATUS_SHARE.items():
        targets += [status] * round(members * share)
    targets += [MemberStatus.ACTIVE] * (members - len(targets))
    rng.shuffle(targets)

    now = utcnow()
    for index, target in enumerate(targets):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        org = organisations[index % len(organisations)]
        member = await create_member(
            session,
            principal,
            MemberCreate(
                email=f"{first.lower().replace(' ', '.')}.{last.lower()}.{index}@example.org",
                first_name=first,
                last_name=last,
                organisation_id=org.public_id,
                consent=Consent(email=rng.random() < 0.7, sms=rng.random() < 0.3,
                                analytics=rng.random() < 0.6, profiling=rng.random() < 0.2),
                custom_fields={"profession": rng.choice(["planner", "architect", "engineer"])},
            ),
        )  # fmt: skip
        if target == MemberStatus.PENDING:
            continue
        plan = rng.choice(plans)
        _, term = await memberships.join(session, principal, member.public_id, plan.public_id, None)
        if target in (MemberStatus.GRACE, MemberStatus.LAPSED):
            # Backdate the term so that the scheduler's own transition puts them there.
            overdue = timedelta(days=rng.randint(1, 10) if target == MemberStatus.GRACE else 400)
            length = term.ends_at - term.starts_at
            term.ends_at = member.term_ends_at = now - overdue
            term.starts_at = member.member_since = term.ends_at - length
            member.grace_ends_at = member.term_ends_at + timedelta(days=plan.grace_days)
            await memberships.advance_due_member(session, actor, member, now)
        elif target == MemberStatus.SUSPENDED:
            await memberships.suspend(session, principal, member.public_id, "demo: dues query")
        elif target == MemberStatus.CANCELLED:
            await memberships.cancel(
                session, principal, member.public_id, at_period_end=False, note="demo"
            )
    return (
        f"loaded the demo data set: organisation {hq.public_id} with chapters "
        f"{', '.join(c.public_id for c in chapters)}, {len(plans)} plans, {members} members"
    )
