"""Finance across organisations: an organisation's books report its own members only, and
members sharing an address are each their own contact."""

from __future__ import annotations

import httpx

from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.fakes.stripe import FakeStripe
from tests.fakes.xero import FakeXero
from tests.finance.conftest import (
    checkout_event,
    connect,
    create_xero_integration,
    mapping_body,
    put,
    reconcile,
    work,
)
from tests.integrations.conftest import create_stripe_integration, send
from tests.support import ApiClient


async def test_an_organisations_reconciliation_ignores_other_organisations_memberships(
    api: ApiClient,
    http: httpx.AsyncClient,
    db: Database,
    hub: IntegrationHub,
    xero: FakeXero,
    stripe_api: FakeStripe,
) -> None:
    north = await api.create_organisation()
    south = await api.create_organisation()
    plan = await api.create_plan(price_amount=2500, currency="GBP")
    await create_stripe_integration(api, organisation_id=north["id"], base_url=stripe_api.url)
    north_xero = await create_xero_integration(api, xero, organisation_id=north["id"])
    await connect(api, http, north_xero["id"])
    saved = await put(
        api, f"/api/v1/integrations/{north_xero['id']}/accounting-mapping", mapping_body(plan)
    )
    assert saved.status_code == 200, saved.text
    # South's member joins (South's business, not North's books).
    south_member = await api.create_member(organisation_id=south["id"])
    joined = await api.post(
        f"/api/v1/members/{south_member['id']}/membership/join", {"plan_id": plan["id"]}
    )
    assert joined.status_code == 200, joined.text

    report = await reconcile(api, db, hub, north_xero["id"])

    assert [m["member_id"] for m in report["mismatches"]] == []
    assert report["summary"]["membership_terms"] == 0


async def test_two_members_sharing_an_email_in_two_organisations_are_two_contacts(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    north = await api.create_organisation()
    south = await api.create_organisation()
    plan = await api.create_plan(price_amount=1000, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await create_xero_integration(api, xero)
    await connect(api, http, integration["id"])
    saved = await put(
        api, f"/api/v1/integrations/{integration['id']}/accounting-mapping", mapping_body(plan)
    )
    assert saved.status_code == 200, saved.text
    first = await api.create_member(organisation_id=north["id"], email="pat@example.com")
    second = await api.create_member(organisation_id=south["id"], email="pat@example.com")
    for member in (first, second):
        assert (await send(http, stripe["id"], checkout_event(member, plan))).is_success
        await work(db, hub)

    assert sorted(c["ContactNumber"] for c in xero.contacts) == sorted([first["id"], second["id"]])
    by_member = {c["ContactNumber"]: c["ContactID"] for c in xero.contacts}
    invoiced = sorted(i["Contact"]["ContactID"] for i in xero.invoices)
    assert invoiced == sorted(by_member.values())
