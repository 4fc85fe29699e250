"""The Xero fake behaves as Xero's documentation says: identity (30-minute access tokens,
rotating refresh tokens), tenants, validation errors, limits and idempotency keys."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.fakes.xero import ACCESS_TOKEN_SECONDS, FakeXero, running_fake_xero


@pytest.fixture
async def xero() -> AsyncIterator[FakeXero]:
    async with running_fake_xero() as fake:
        fake.add_account("200", "Sales", "REVENUE")
        fake.add_account("090", "Bank", "BANK")
        yield fake


def headers(xero: FakeXero, token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "xero-tenant-id": xero.tenant.tenant_id, **extra}


async def contact(client: httpx.AsyncClient, xero: FakeXero, token: str) -> str:
    made = await client.post(
        f"{xero.url}/api.xro/2.0/Contacts",
        json={"Contacts": [{"Name": "Ada Lovelace", "ContactNumber": "mem_1"}]},
        headers=headers(xero, token),
    )
    assert made.status_code == 200, made.text
    return str(made.json()["Contacts"][0]["ContactID"])


def invoice(contact_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "Invoices": [
            {
                "Type": "ACCREC",
                "Contact": {"ContactID": contact_id},
                "CurrencyCode": "GBP",
                "Status": "AUTHORISED",
                "LineItems": [{"Description": "x", "UnitAmount": "15.00", "AccountCode": "200"}],
                **fields,
            }
        ]
    }


async def test_tokens_last_thirty_minutes_and_refresh_tokens_rotate(xero: FakeXero) -> None:
    async with httpx.AsyncClient() as client:
        start = await client.get(
            xero.authorize_url,
            params={
                "response_type": "code",
                "client_id": xero.client_id,
                "redirect_uri": "http://127.0.0.1/cb",
                "scope": "offline_access accounting.transactions",
                "state": "s1",
            },
        )
        assert start.status_code == 302
        code = httpx.URL(start.headers["location"]).params["code"]
        basic = base64.b64encode(f"{xero.client_id}:{xero.client_secret}".encode()).decode()
        tokens = await client.post(
            xero.token_url,
            data={"grant_type": "authorization_code", "code": code},
            headers={"Authorization": f"Basic {basic}"},
        )
        assert tokens.status_code == 200
        body = tokens.json()
        assert body["expires_in"] == ACCESS_TOKEN_SECONDS == 1800
        assert body["token_type"] == "Bearer"
        connections = await client.get(
            f"{xero.url}/connections", headers={"Authorization": f"Bearer {body['access_token']}"}
        )
        assert [c["tenantId"] for c in connections.json()] == [xero.tenant.tenant_id]
        assert connections.json()[0]["tenantType"] == "ORGANISATION"

        xero.expire_access_tokens()
        expired = await client.get(
            f"{xero.url}/api.xro/2.0/Accounts", headers=headers(xero, body["access_token"])
        )
        assert expired.status_code == 401
        form = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
        in_form = {**form, "client_id": xero.client_id, "client_secret": xero.client_secret}
        refused = await client.post(xero.token_url, data=in_form)  # the client by Basic only
        assert refused.status_code == 400
        assert refused.json() == {"error": "invalid_client"}
        basic_auth = {"Authorization": f"Basic {basic}"}
        renewed = await client.post(xero.token_url, data=form, headers=basic_auth)
        assert renewed.status_code == 200
        assert renewed.json()["refresh_token"] != body["refresh_token"]
        spent = await client.post(xero.token_url, data=form, headers=basic_auth)
        assert spent.status_code == 400
        assert spent.json() == {"error": "invalid_grant"}
        # The code is single use too.
        again = await client.post(
            xero.token_url,
            data={"grant_type": "authorization_code", "code": code},
            headers={"Authorization": f"Basic {basic}"},
        )
        assert again.status_code == 400


async def test_the_tenant_header_is_required(xero: FakeXero) -> None:
    token = xero.issue_tokens()["access_token"]
    async with httpx.AsyncClient() as client:
        missing = await client.get(
            f"{xero.url}/api.xro/2.0/Accounts", headers={"Authorization": f"Bearer {token}"}
        )
        assert missing.status_code == 403
        found = await client.get(f"{xero.url}/api.xro/2.0/Accounts", headers=headers(xero, token))
        assert [a["Code"] for a in found.json()["Accounts"]] == ["200", "090"]


async def test_validation_errors_come_in_xeros_format(xero: FakeXero) -> None:
    token = xero.issue_tokens()["access_token"]
    async with httpx.AsyncClient() as client:
        contact_id = await contact(client, xero, token)
        body = invoice(contact_id, CurrencyCode="JPY")
        body["Invoices"][0]["LineItems"][0]["AccountCode"] = "999"
        body["Invoices"][0]["LineItems"][0]["TaxType"] = "INPUT2"  # for purchases only
        refused = await client.post(
            f"{xero.url}/api.xro/2.0/Invoices", json=body, headers=headers(xero, token)
        )
    assert refused.status_code == 400
    error = refused.json()
    assert error["ErrorNumber"] == 10
    assert error["Type"] == "ValidationException"
    assert error["Message"] == "A validation exception occurred"
    assert [v["Message"] for v in error["Elements"][0]["ValidationErrors"]] == [
        "Organisation is not subscribed to currency JPY",
        "Account code '999' is not a valid code for this document.",
        "The TaxType code 'INPUT2' does not exist or cannot be used with this type of transaction.",
    ]
    assert xero.invoices == []


async def test_tax_rates_are_listed_as_xero_lists_them(xero: FakeXero) -> None:
    token = xero.issue_tokens()["access_token"]
    async with httpx.AsyncClient() as client:
        listed = await client.get(f"{xero.url}/api.xro/2.0/TaxRates", headers=headers(xero, token))
    assert listed.status_code == 200, listed.text
    rates = {rate["TaxType"]: rate for rate in listed.json()["TaxRates"]}
    assert rates["OUTPUT2"]["CanApplyToRevenue"] is True
    assert rates["INPUT2"]["CanApplyToRevenue"] is False
    assert {rate["Status"] for rate in rates.values()} == {"ACTIVE"}


async def test_an_idempotency_key_answers_the_first_create_again(xero: FakeXero) -> None:
    token = xero.issue_tokens()["access_token"]
    async with httpx.AsyncClient() as client:
        contact_id = await contact(client, xero, token)
        sent = [
            await client.post(
                f"{xero.url}/api.xro/2.0/Invoices",
                json=invoice(contact_id, Reference="cs_1"),
                headers=headers(xero, token, **{"Idempotency-Key": "k1"}),
            )
            for _ in range(2)
        ]
        assert sent[0].json()["Invoices"] == sent[1].json()["Invoices"]
        other = await client.post(
            f"{xero.url}/api.xro/2.0/Invoices",
            json=invoice(contact_id, Reference="cs_2"),
            headers=headers(xero, token, **{"Idempotency-Key": "k1"}),
        )
        assert other.status_code == 400
        listed = await client.get(
            f"{xero.url}/api.xro/2.0/Invoices",
            params={"where": 'Reference=="cs_1"'},
            headers=headers(xero, token),
        )
    assert len(xero.invoices) == 1
    assert [i["Reference"] for i in listed.json()["Invoices"]] == ["cs_1"]


async def test_the_minute_limit_answers_429_with_retry_after(xero: FakeXero) -> None:
    xero.set_limits(per_minute=3)
    token = xero.issue_tokens()["access_token"]
    async with httpx.AsyncClient() as client:
        answers = [
            await client.get(f"{xero.url}/api.xro/2.0/Accounts", headers=headers(xero, token))
            for _ in range(4)
        ]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["x-minlimit-remaining"] == "2"
    assert answers[0].headers["x-daylimit-remaining"] == "4999"
    assert int(answers[3].headers["retry-after"]) >= 1
    assert answers[3].headers["x-rate-limit-problem"] == "minute"


async def test_payments_follow_xeros_rules(xero: FakeXero) -> None:
    token = xero.issue_tokens()["access_token"]
    async with httpx.AsyncClient() as client:
        contact_id = await contact(client, xero, token)
        made = await client.post(
            f"{xero.url}/api.xro/2.0/Invoices",
            json=invoice(contact_id),
            headers=headers(xero, token),
        )
        invoice_id = made.json()["Invoices"][0]["InvoiceID"]

        async def pay(amount: str, code: str = "090") -> httpx.Response:
            return await client.post(
                f"{xero.url}/api.xro/2.0/Payments",
                json={
                    "Payments": [
                        {
                            "Invoice": {"InvoiceID": invoice_id},
                            "Account": {"Code": code},
                            "Amount": amount,
                        }
                    ]
                },
                headers=headers(xero, token),
            )

        too_much = await pay("20.00")
        assert too_much.status_code == 400
        not_bank = await pay("15.00", code="200")
        assert not_bank.status_code == 400
        assert (await pay("15.00")).status_code == 200
    [paid] = xero.invoices
    assert paid["Status"] == "PAID"
    assert paid["AmountDue"] == 0
