"""Property-based tests of the whole API against its own OpenAPI schema (schemathesis).

Every operation in `/openapi.json` gets generated requests, valid and invalid, sent in-process
to a real application on the test database, as an installation-wide admin (one case in five
with whatever credentials schemathesis made up instead). A response fails the test when it is
a 5xx (an exception the app raises fails it too), carries an undocumented status code or
content type, or has a body that does not match the schema. In about half of the cases the
ids in the path, query and body are swapped for seeded objects', so operations get past their
lookups too.

The suite runs a short pass (10 examples per operation, new ones each run); `make schemathesis`
sets MEMBERHUB_SCHEMATHESIS_EXAMPLES=200.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from memberhub.app import create_app
from memberhub.auth.principal import Principal
from memberhub.auth.roles import Role
from memberhub.auth.service import create_api_key
from memberhub.events.models import Event
from memberhub.kit.actor import Actor
from memberhub.kit.db import Database
from memberhub.members.schemas import MemberCreate
from memberhub.members.service import create_member
from memberhub.memberships.schemas import PlanCreate
from memberhub.memberships.service import create_plan, join
from memberhub.organisations.schemas import OrganisationCreate
from memberhub.organisations.service import create_organisation
from memberhub.settings import Settings
from tests.support import ApiClient, unique

EXAMPLES = int(os.environ.get("MEMBERHUB_SCHEMATHESIS_EXAMPLES", "10"))
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
# Generated traffic must never meet the rate limit, or a 429 would hide what it tests.
UNLIMITED = "1000000/minute"


@dataclass(frozen=True)
class Seeded:
    """Real objects, by the parameter names that refer to them."""

    ids: dict[str, str]
    authorization: str


@pytest.fixture
async def seeded(db: Database) -> Seeded:
    """An organisation, a plan, a member who joined it and its events, made through the
    services in one transaction (as HTTP requests they cost more than the generated
    requests of most operations)."""
    principal = Principal.system(Actor.system("schemathesis"))
    async with db.transaction() as session:
        issued = await create_api_key(
            session, principal.actor, name="schemathesis", role=Role.ADMIN, rate_limit=UNLIMITED
        )
        slug = unique("org-")
        org = await create_organisation(
            session, principal, OrganisationCreate(name=slug.title(), slug=slug)
        )
        plan = await create_plan(
            session,
            principal,
            PlanCreate(
                code=unique("PLAN"),
                name="Standard",
                term_months=12,
                price_amount=12000,
                currency="MYR",
                organisation_id=org.public_id,
            ),
        )
        member = await create_member(
            session,
            principal,
            MemberCreate(
                email=f"{unique('m')}@example.com",
                organisation_id=org.public_id,
                first_name="Seed",
            ),
        )
        await join(session, principal, member.public_id, plan.public_id, None)
        event_id = await session.scalar(
            select(Event.public_id)
            .where(Event.member_public_id == member.public_id)
            .order_by(Event.id)
            .limit(1)
        )
    assert event_id is not None
    return Seeded(
        ids={
            "organisation_id": org.public_id,
            "parent_id": org.public_id,
            "plan_id": plan.public_id,
            "member_id": member.public_id,
            "event_id": event_id,
        },
        authorization=f"Bearer {issued.secret}",
    )


@pytest.fixture
def app_under_test(settings: Settings, seeded: Seeded) -> Iterator[FastAPI]:
    """The application the generated requests go to, on the test database.

    schemathesis serves it from its own event-loop thread, so it is not the `app` fixture
    (whose engine belongs to the test's loop); stopping its lifespan in that thread disposes
    of its engine there.
    """
    application = create_app(settings)
    yield application
    schemathesis_asgi.shutdown_lifespans()


# The schema is what `/openapi.json` serves; it does not depend on the database, so an
# application that never connects to one provides it when the module is collected. (Loading
# it from a fixture, `schemathesis.pytest.from_fixture`, breaks under pytest 9: it sets
# `Function._nodeid`, which pytest 9 no longer has.) Requests go to `app_under_test`.
_schema_source = create_app(
    Settings(database_url="postgresql+asyncpg://schema-only.invalid/none", log_level="WARNING")
)
schema = schemathesis.openapi.from_asgi("/openapi.json", _schema_source)
schema.config.generation.update(max_examples=EXAMPLES, database="none")


def _point_at_real_objects(case: schemathesis.Case, ids: dict[str, str]) -> None:
    """Swap generated ids for seeded ones, in the path, the query and a JSON object body."""
    for container in (case.path_parameters, case.query, case.body):
        if isinstance(container, dict):
            for name in container.keys() & ids.keys():
                container[name] = ids[name]


@schema.parametrize()
# The fixtures hold ids and a key that every generated request may share.
# The schema's request examples are checked against the models in test_openapi.py; here
# the explicit phase would clash with `given`.
@hypothesis_settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
@schema.given(
    use_real_ids=st.booleans(),
    # About one case in five keeps the Authorization schemathesis generated (none, or junk),
    # so that authentication itself meets generated input too.
    generated_auth=st.integers(min_value=0, max_value=4).map(lambda n: n == 4),
)
def test_api_conforms_to_its_schema(
    case: schemathesis.Case,
    use_real_ids: bool,
    generated_auth: bool,
    seeded: Seeded,
    app_under_test: FastAPI,
) -> None:
    if use_real_ids:
        _point_at_real_objects(case, seeded.ids)
    headers = None if generated_auth else {"Authorization": seeded.authorization}
    case.call_and_validate(headers=headers, checks=CHECKS, app=app_under_test)


# Inputs schemathesis found that failed with a 500 (on PostgreSQL), kept as plain tests.


async def test_large_prices_are_stored_and_prices_past_the_safe_range_refused(
    api: ApiClient,
) -> None:
    too_big = await api.post(
        "/api/v1/plans",
        {"code": "BIG", "name": "Big", "term_months": 12, "price_amount": 2**53, "currency": "IDR"},
    )
    assert too_big.status_code == 422, too_big.text
    largest = await api.create_plan(price_amount=2**53 - 1, currency="IDR")
    assert largest["price_amount"] == 2**53 - 1


async def test_a_nul_in_the_parent_filter_is_refused(api: ApiClient) -> None:
    response = await api.get("/api/v1/organisations", {"parent_id": "\x00"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_a_key_with_a_nul_is_just_invalid(api: ApiClient) -> None:
    key = "mh_\x00" + "a" * 43
    response = await api.http.get(
        "/api/v1/members", headers=[(b"authorization", f"Bearer {key}".encode())]
    )
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "INVALID_API_KEY"
