"""The accounting mapping is checked against the Xero organisation when it is saved."""

from __future__ import annotations

from typing import Any

import httpx

from memberhub.auth.roles import Role
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.db import Database
from tests.conftest import issue_key
from tests.fakes.xero import FakeXero
from tests.finance.conftest import (
    checkout_event,
    connect,
    create_xero_integration,
    mapping_body,
    put,
    work,
)
from tests.integrations.conftest import create_stripe_integration, send
from tests.support import ApiClient


async def test_an_account_code_xero_does_not_have_is_refused_with_xeros_message(
    api: ApiClient, http: httpx.AsyncClient, db: Database, xero: FakeXero
) -> None:
    plan = await api.create_plan(currency="GBP")
    integration = await create_xero_integration(api, xero)
    await connect(api, http, integration["id"])
    url = f"/api/v1/integrations/{integration['id']}/accounting-mapping"
    body = mapping_body(plan)
    body["plans"][plan["id"]]["account_code"] = "999"

    refused = await put(api, url, body)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "MAPPING_REFUSED"
    assert error["message"] == "Account code '999' is not a valid code for this document."
    assert error["details"]["errors"] == [
        {
            "field": f"plans.{plan['id']}.account_code",
            "message": "Account code '999' is not a valid code for this document.",
        }
    ]
    assert (await api.get(url)).status_code == 404  # nothing kept


async def test_payments_need_a_bank_account_and_tracking_must_exist(
    api: ApiClient, http: httpx.AsyncClient, xero: FakeXero
) -> None:
    plan = await api.create_plan(currency="GBP")
    integration = await create_xero_integration(api, xero)
    await connect(api, http, integration["id"])
    url = f"/api/v1/integrations/{integration['id']}/accounting-mapping"
    body = mapping_body(plan, payments_account_code="404")
    body["plans"][plan["id"]]["tracking"] = [{"category": "Region", "option": "East"}]

    refused = await put(api, url, body)
    assert refused.status_code == 422
    fields = [e["field"] for e in refused.json()["error"]["details"]["errors"]]
    assert fields == [f"plans.{plan['id']}.tracking.0", "payments_account_code"]


async def test_payouts_are_booked_between_bank_accounts_only(
    api: ApiClient, http: httpx.AsyncClient, xero: FakeXero
) -> None:
    plan = await api.create_plan(currency="GBP")
    xero.add_account("800", "Stripe receivable", "CURRENT", payments=True)
    integration = await create_xero_integration(api, xero)
    await connect(api, http, integration["id"])
    url = f"/api/v1/integrations/{integration['id']}/accounting-mapping"

    for changes, field in (
        ({"payouts_bank_account_code": "800"}, "payouts_bank_account_code"),
        ({"payments_account_code": "800"}, "payments_account_code"),
    ):
        refused = await put(api, url, mapping_body(plan, **changes))
        assert refused.status_code == 422, refused.text
        assert [e["field"] for e in refused.json()["error"]["details"]["errors"]] == [field]
        assert "BANK" in refused.json()["error"]["message"]
    # Without payouts booked, an account with payments enabled takes the takings.
    saved = await put(
        api,
        url,
        mapping_body(plan, payments_account_code="800", payouts_bank_account_code=None),
    )
    assert saved.status_code == 200, saved.text


async def test_a_tax_type_the_organisation_cannot_charge_on_sales_is_refused(
    api: ApiClient, http: httpx.AsyncClient, xero: FakeXero
) -> None:
    plan = await api.create_plan(currency="GBP")
    integration = await create_xero_integration(api, xero)
    await connect(api, http, integration["id"])
    url = f"/api/v1/integrations/{integration['id']}/accounting-mapping"
    # One Xero does not have, and one it has for purchases only.
    for tax_type in ("NOSUCHTAX", "INPUT2"):
        body = mapping_body(plan)
        body["plans"][plan["id"]]["tax_type"] = tax_type
        refused = await put(api, url, body)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "MAPPING_REFUSED"
        fields = [e["field"] for e in refused.json()["error"]["details"]["errors"]]
        assert fields == [f"plans.{plan['id']}.tax_type"]
    body = mapping_body(plan)
    body["plans"][plan["id"]]["tax_type"] = "OUTPUT2"
    assert (await put(api, url, body)).status_code == 200


async def test_bad_mapping_input_is_a_clear_4xx(
    api: ApiClient, http: httpx.AsyncClient, xero: FakeXero
) -> None:
    plan = await api.create_plan(currency="GBP")
    integration = await create_xero_integration(api, xero)
    url = f"/api/v1/integrations/{integration['id']}/accounting-mapping"
    bodies: list[Any] = [
        {},
        {"payments_account_code": "090"},  # no revenue
        {**mapping_body(plan), "unknown": 1},
        {**mapping_body(plan), "payments_account_code": ""},
        {**mapping_body(plan), "plans": {"no-such-plan": {"account_code": "200"}}},
        [],
    ]
    for body in bodies:
        response = await put(api, url, body)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert "error" in response.json()
    # Not connected yet: refused before any call to Xero.
    response = await put(api, url, mapping_body(plan))
    assert response.status_code == 422
    assert "Connect" in response.json()["error"]["message"]
    missing = await put(
        api, "/api/v1/integrations/int_nosuchthing/accounting-mapping", mapping_body(plan)
    )
    assert missing.status_code == 404


async def test_the_tenant_is_chosen_from_the_connections(
    api: ApiClient, http: httpx.AsyncClient, xero: FakeXero
) -> None:
    plan = await api.create_plan(currency="GBP")
    second = xero.add_tenant("Second Chapter")
    xero.add_account("210", "Membership fees", "REVENUE", tenant=second)
    xero.add_account("090", "Stripe clearing", "BANK", tenant=second)
    xero.add_account("091", "Bank", "BANK", tenant=second)
    xero.add_account("404", "Fees", "EXPENSE", tenant=second)
    xero.add_tracking("Region", "North", tenant=second)
    integration = await create_xero_integration(api, xero)
    await connect(api, http, integration["id"])
    url = f"/api/v1/integrations/{integration['id']}/accounting-mapping"

    ambiguous = await put(api, url, mapping_body(plan))
    assert ambiguous.status_code == 422
    tenants = ambiguous.json()["error"]["details"]["tenants"]
    assert {t["tenant_id"] for t in tenants} == set(xero.tenants)

    chosen = await put(api, url, {**mapping_body(plan), "tenant_id": second.tenant_id})
    assert chosen.status_code == 200, chosen.text
    assert chosen.json()["tenant_name"] == "Second Chapter"
    shown = await api.get(url)
    assert shown.json()["tenant_id"] == second.tenant_id
    assert shown.json()["mapping"]["payments_account_code"] == "090"
    audited = await api.get("/api/v1/audit", {"action": "finance.mapping.save"})
    [entry] = audited.json()["data"]
    assert entry["object_id"] == integration["id"]


async def test_an_organisations_xero_books_only_its_own_organisations_stripe(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    north = await api.create_organisation()
    south = await api.create_organisation()
    plan = await api.create_plan(price_amount=1000, currency="GBP")
    south_stripe = await create_stripe_integration(api, organisation_id=south["id"])
    north_xero = await create_xero_integration(api, xero, organisation_id=north["id"])
    await connect(api, http, north_xero["id"])
    saved = await put(
        api, f"/api/v1/integrations/{north_xero['id']}/accounting-mapping", mapping_body(plan)
    )
    assert saved.status_code == 200, saved.text
    south_member = await api.create_member(organisation_id=south["id"])
    assert (await send(http, south_stripe["id"], checkout_event(south_member, plan))).is_success
    await work(db, hub, rounds=2)
    assert xero.invoices == []
    north_key = api.with_key(await issue_key(db, Role.ADMIN, organisation=north["id"]))
    listed = await north_key.get(f"/api/v1/integrations/{north_xero['id']}/finance-entries")
    assert listed.status_code == 200, listed.text
    assert listed.json()["data"] == []
    # Its own chapter's Stripe is its business; with two candidates, the mapping names one.
    chapter = await api.create_organisation(parent_id=north["id"])
    await create_stripe_integration(api, organisation_id=chapter["id"])
    await create_stripe_integration(api, organisation_id=north["id"])
    refused = await put(
        api, f"/api/v1/integrations/{north_xero['id']}/accounting-mapping", mapping_body(plan)
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["details"]["field"] == "payments_integration_id"


async def test_a_mapping_saved_after_the_access_token_expired_keeps_the_rotated_token(
    api: ApiClient, http: httpx.AsyncClient, db: Database, hub: IntegrationHub, xero: FakeXero
) -> None:
    plan = await api.create_plan(price_amount=1000, currency="GBP")
    stripe = await create_stripe_integration(api)
    integration = await create_xero_integration(api, xero)
    await connect(api, http, integration["id"])
    xero.expire_access_tokens()  # saved more than 30 minutes after connecting
    saved = await put(
        api, f"/api/v1/integrations/{integration['id']}/accounting-mapping", mapping_body(plan)
    )
    assert saved.status_code == 200, saved.text
    assert xero.token_grants.count("refresh_token") == 1
    member = await api.create_member()
    assert (await send(http, stripe["id"], checkout_event(member, plan))).is_success
    await work(db, hub, rounds=2)
    assert len(xero.invoices) == 1
    assert xero.token_grants.count("refresh_token") == 1  # the rotated token still works
