"""The fake Stripe API answers as Stripe does, and its events verify with Stripe's library."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import stripe

from tests.fakes.stripe import (
    API_VERSION,
    FakeStripe,
    charge,
    checkout_session_completed,
    invoice,
    make_event,
    parse_stripe_form,
    running_fake_stripe,
    signed,
    subscription,
)

SECRET_KEY = "sk_test_51Fake00000000000000001234"
WEBHOOK_SECRET = "whsec_test_fake_secret_for_signatures"

# The stripe library's HTTPX client posts bytes with `data=`, which httpx deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[FakeStripe]:
    # One server for the module, as starting one costs ~0.2 s; each test starts from reset().
    async with running_fake_stripe(secret_key=SECRET_KEY) as fake:
        yield fake


@pytest.fixture
def fake(running: FakeStripe) -> FakeStripe:
    running.reset()
    return running


@pytest.fixture
async def http(fake: FakeStripe) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {SECRET_KEY}"}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers, timeout=5) as client:
        yield client


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    """Stripe's own client, pointed at the fake, without retries of its own."""
    return stripe.StripeClient(
        SECRET_KEY,
        base_addresses={"api": fake.url},
        http_client=stripe.HTTPXClient(),
        max_network_retries=0,
    )


def subscription_checkout(**overrides: str) -> dict[str, str]:
    form = {
        "mode": "subscription",
        "client_reference_id": "mem_1",
        "success_url": "https://club.example/success",
        "cancel_url": "https://club.example/cancel",
        "line_items[0][price_data][currency]": "GBP",
        "line_items[0][price_data][unit_amount]": "1500",
        "line_items[0][price_data][product_data][name]": "Gold membership",
        "line_items[0][price_data][recurring][interval]": "month",
        "line_items[0][quantity]": "2",
        "metadata[member_id]": "mem_1",
        "metadata[plan_id]": "plan_gold",
        "subscription_data[metadata][plan_id]": "plan_gold",
    }
    form.update(overrides)
    return form


def test_bracket_notation_decodes_into_nested_dicts_and_lists() -> None:
    pairs = [
        ("metadata[member_id]", "mem_1"),
        ("line_items[1][quantity]", "3"),
        ("line_items[0][price_data][currency]", "gbp"),
        ("line_items[0][quantity]", "1"),
        ("expand[]", "customer"),
        ("expand[]", "line_items"),
        ("mode", "payment"),
    ]

    assert parse_stripe_form(pairs) == {
        "metadata": {"member_id": "mem_1"},
        "line_items": [{"price_data": {"currency": "gbp"}, "quantity": "1"}, {"quantity": "3"}],
        "expand": ["customer", "line_items"],
        "mode": "payment",
    }


# --------------------------------------------------------------------------- customers


async def test_created_customer_can_be_retrieved_and_listed_by_email(
    fake: FakeStripe, http: httpx.AsyncClient
) -> None:
    created = await http.post(
        "/v1/customers",
        data={"email": "ada@example.com", "name": "Ada", "metadata[member_id]": "mem_1"},
    )
    other = (await http.post("/v1/customers", data={"email": "bob@example.com"})).json()

    assert created.status_code == 200
    customer = created.json()
    assert customer["id"].startswith("cus_")
    assert customer["object"] == "customer"
    assert (customer["email"], customer["name"]) == ("ada@example.com", "Ada")
    assert customer["metadata"] == {"member_id": "mem_1"}
    assert customer["livemode"] is False
    assert (await http.get(f"/v1/customers/{customer['id']}")).json() == customer
    listed = (await http.get("/v1/customers", params={"email": "ada@example.com"})).json()
    assert listed == {
        "object": "list",
        "data": [customer],
        "has_more": False,
        "url": "/v1/customers",
    }
    assert fake.customers == {customer["id"]: customer, other["id"]: other}


async def test_customer_list_is_newest_first_and_paginates(http: httpx.AsyncClient) -> None:
    ids = [
        (await http.post("/v1/customers", data={"name": f"c{i}"})).json()["id"] for i in range(3)
    ]

    first = (await http.get("/v1/customers", params={"limit": 2})).json()
    rest = (await http.get("/v1/customers", params={"limit": 2, "starting_after": ids[1]})).json()

    assert [c["id"] for c in first["data"]] == [ids[2], ids[1]]
    assert first["has_more"] is True
    assert ([c["id"] for c in rest["data"]], rest["has_more"]) == ([ids[0]], False)
    bad_limit = await http.get("/v1/customers", params={"limit": 101})
    assert bad_limit.status_code == 400
    assert bad_limit.json()["error"]["param"] == "limit"


async def test_stripe_library_reads_the_fake_objects(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    created = await client.v1.customers.create_async(
        params={"email": "ada@example.com", "metadata": {"member_id": "mem_1"}}
    )
    fetched = await client.v1.customers.retrieve_async(created.id)
    listed = await client.v1.customers.list_async(params={"email": "ada@example.com"})
    account = await client.v1.accounts.retrieve_current_async()

    assert isinstance(fetched, stripe.Customer)
    assert fetched.id == created.id
    assert fetched.metadata is not None
    assert fetched.metadata["member_id"] == "mem_1"
    assert [c.id for c in listed.data] == [created.id]
    assert account.id.startswith("acct_")
    assert account.object == "account"
    assert fake.count("POST", "/v1/customers") == 1
    assert fake.count("GET", "/v1/") == 3


async def test_unknown_customer_is_resource_missing(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/customers/cus_nope")

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "resource_missing"
    assert error["message"] == "No such customer: 'cus_nope'"
    assert error["param"] == "id"


async def test_unknown_parameter_and_unknown_url_are_refused(http: httpx.AsyncClient) -> None:
    unknown_param = await http.post("/v1/customers", data={"emial": "ada@example.com"})
    unknown_url = await http.get("/v1/members")

    assert unknown_param.status_code == 400
    assert unknown_param.json()["error"]["code"] == "parameter_unknown"
    assert unknown_param.json()["error"]["param"] == "emial"
    assert unknown_url.status_code == 404
    assert "Unrecognized request URL (GET: /v1/members)" in unknown_url.json()["error"]["message"]


# --------------------------------------------------------------------------- authentication


async def test_missing_or_wrong_api_key_is_refused(fake: FakeStripe) -> None:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5) as anonymous:
        missing = await anonymous.get("/v1/account")
        wrong = await anonymous.get(
            "/v1/account", headers={"authorization": "Bearer sk_test_wrongkey1234"}
        )
        basic = await anonymous.get("/v1/account", auth=(SECRET_KEY, ""))

    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert "You did not provide an API key" in missing.json()["error"]["message"]
    assert wrong.json()["error"]["message"] == "Invalid API Key provided: sk_test_****1234"
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    assert basic.status_code == 200


async def test_stripe_library_raises_authentication_error_for_a_wrong_key(
    fake: FakeStripe,
) -> None:
    client = stripe.StripeClient(
        "sk_test_otherkey9999",
        base_addresses={"api": fake.url},
        http_client=stripe.HTTPXClient(),
        max_network_retries=0,
    )

    with pytest.raises(stripe.AuthenticationError, match=r"sk_test_\*\*\*\*9999"):
        await client.v1.accounts.retrieve_current_async()


# --------------------------------------------------------------------------- checkout


async def test_subscription_checkout_session_has_stripe_shape(
    fake: FakeStripe, http: httpx.AsyncClient
) -> None:
    customer = fake.add_customer(email="ada@example.com")

    response = await http.post(
        "/v1/checkout/sessions", data=subscription_checkout(customer=customer["id"])
    )

    assert response.status_code == 200
    session = response.json()
    assert session["id"].startswith("cs_test_")
    assert session["object"] == "checkout.session"
    assert session["url"] == f"https://checkout.stripe.com/c/pay/{session['id']}"
    assert (session["status"], session["payment_status"]) == ("open", "unpaid")
    assert (session["mode"], session["customer"]) == ("subscription", customer["id"])
    assert (session["amount_total"], session["currency"]) == (3000, "gbp")
    assert session["client_reference_id"] == "mem_1"
    assert session["metadata"] == {"member_id": "mem_1", "plan_id": "plan_gold"}
    assert session["expires_at"] - session["created"] == 24 * 60 * 60
    assert (await http.get(f"/v1/checkout/sessions/{session['id']}")).json() == session
    assert fake.checkout_sessions == {session["id"]: session}
    [item] = (await http.get(f"/v1/checkout/sessions/{session['id']}/line_items")).json()["data"]
    assert (item["quantity"], item["amount_total"]) == (2, 3000)
    assert item["price"]["recurring"]["interval"] == "month"
    recorded = fake.requests[0]
    assert recorded.form["subscription_data"] == {"metadata": {"plan_id": "plan_gold"}}
    assert recorded.form["line_items"][0]["price_data"]["product_data"] == {
        "name": "Gold membership"
    }


async def test_checkout_with_a_price_id_needs_the_price_to_exist(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    price = fake.add_price(4900, "gbp", price_id="price_annual")

    session = await client.v1.checkout.sessions.create_async(
        params={
            "mode": "payment",
            "success_url": "https://club.example/success",
            "line_items": [{"price": "price_annual", "quantity": 1}],
        }
    )

    assert (session.amount_total, session.currency) == (4900, price["currency"])
    assert session.customer_creation == "if_required"
    with pytest.raises(stripe.InvalidRequestError) as refused:
        await client.v1.checkout.sessions.create_async(
            params={
                "mode": "payment",
                "success_url": "https://club.example/success",
                "line_items": [{"price": "price_missing", "quantity": 1}],
            }
        )
    assert refused.value.code == "resource_missing"
    assert refused.value.param == "line_items[0][price]"


@pytest.mark.parametrize(
    ("form", "param", "code"),
    [
        (subscription_checkout(success_url=""), "success_url", "parameter_missing"),
        ({"success_url": "https://club.example/ok"}, "mode", "parameter_missing"),
        (
            {"mode": "payment", "success_url": "https://club.example/ok"},
            "line_items",
            "parameter_missing",
        ),
        (
            {
                k: v
                for k, v in subscription_checkout().items()
                if k != "line_items[0][price_data][product_data][name]"
            },
            "line_items[0][price_data][product_data]",
            "parameter_missing",
        ),
        (
            {k: v for k, v in subscription_checkout().items() if k != "line_items[0][quantity]"},
            "line_items[0][quantity]",
            "parameter_missing",
        ),
        (subscription_checkout(customer="cus_unknown"), "customer", "resource_missing"),
    ],
)
async def test_invalid_checkout_is_refused_with_the_param_named(
    fake: FakeStripe, http: httpx.AsyncClient, form: dict[str, str], param: str, code: str
) -> None:
    response = await http.post("/v1/checkout/sessions", data=form)

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert error["doc_url"] == f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    assert fake.checkout_sessions == {}


async def test_recurring_price_in_payment_mode_is_refused(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/checkout/sessions", data=subscription_checkout(mode="payment"))

    assert response.status_code == 400
    assert "recurring price" in response.json()["error"]["message"]


async def test_unknown_checkout_session_is_resource_missing(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/checkout/sessions/cs_test_nope")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "resource_missing"


async def test_completing_a_session_assigns_customer_and_subscription(
    fake: FakeStripe, http: httpx.AsyncClient
) -> None:
    form = subscription_checkout(customer_email="new@example.com")
    session_id = (await http.post("/v1/checkout/sessions", data=form)).json()["id"]

    completed = fake.complete_checkout_session(session_id)

    assert (completed["status"], completed["payment_status"]) == ("complete", "paid")
    assert completed["subscription"].startswith("sub_")
    assert fake.customers[completed["customer"]]["email"] == "new@example.com"
    assert (await http.get(f"/v1/checkout/sessions/{session_id}")).json() == completed


# --------------------------------------------------------------------------- idempotency


async def test_same_idempotency_key_replays_the_first_response(
    fake: FakeStripe, http: httpx.AsyncClient
) -> None:
    headers = {"idempotency-key": "customer-mem_1"}
    form = {"email": "ada@example.com", "metadata[member_id]": "mem_1"}

    first = await http.post("/v1/customers", data=form, headers=headers)
    # The same parameters in another order are the same request.
    again = await http.post("/v1/customers", data=dict(reversed(form.items())), headers=headers)

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.content == first.content
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["original-request"] == first.headers["request-id"]
    assert again.headers["request-id"] != first.headers["request-id"]
    assert again.headers["idempotency-key"] == "customer-mem_1"
    assert len(fake.customers) == 1
    assert fake.count("POST", "/v1/customers") == 2


async def test_idempotency_key_reused_with_other_parameters_is_an_idempotency_error(
    fake: FakeStripe, http: httpx.AsyncClient, client: stripe.StripeClient
) -> None:
    headers = {"idempotency-key": "customer-mem_1"}
    await http.post("/v1/customers", data={"email": "ada@example.com"}, headers=headers)

    response = await http.post("/v1/customers", data={"email": "bob@example.com"}, headers=headers)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "idempotency_error"
    assert "customer-mem_1" in error["message"]
    with pytest.raises(stripe.IdempotencyError):
        await client.v1.customers.create_async(
            params={"email": "eve@example.com"}, options={"idempotency_key": "customer-mem_1"}
        )
    assert [c["email"] for c in fake.customers.values()] == ["ada@example.com"]


async def test_refused_parameters_are_not_saved_under_the_idempotency_key(
    fake: FakeStripe, http: httpx.AsyncClient
) -> None:
    headers = {"idempotency-key": "checkout-1"}

    refused = await http.post(
        "/v1/checkout/sessions", data=subscription_checkout(success_url=""), headers=headers
    )
    accepted = await http.post(
        "/v1/checkout/sessions", data=subscription_checkout(), headers=headers
    )

    assert (refused.status_code, accepted.status_code) == (400, 200)
    assert "idempotent-replayed" not in accepted.headers
    assert len(fake.checkout_sessions) == 1


# --------------------------------------------------------------------------- faults


async def test_fail_next_answers_api_errors_then_recovers_without_saving_the_failure(
    fake: FakeStripe, http: httpx.AsyncClient
) -> None:
    fake.fail_next(2, status=503)
    headers = {"idempotency-key": "customer-mem_2"}

    answers = [
        await http.post("/v1/customers", data={"email": "ada@example.com"}, headers=headers)
        for _ in range(3)
    ]

    assert [a.status_code for a in answers] == [503, 503, 200]
    error = answers[0].json()["error"]
    assert error["type"] == "api_error"
    assert error["request_log_url"].startswith("https://dashboard.stripe.com/test/logs/req_")
    assert answers[0].headers["stripe-should-retry"] == "true"
    assert all(a.headers["request-id"].startswith("req_") for a in answers)
    assert "idempotent-replayed" not in answers[2].headers
    assert len(fake.customers) == 1


async def test_stripe_library_raises_api_error_for_injected_failures(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    fake.fail_next(1)

    with pytest.raises(stripe.APIError) as failed:
        await client.v1.accounts.retrieve_current_async()

    assert failed.value.http_status == 500
    assert failed.value.request_id is not None
    assert failed.value.request_id.startswith("req_")


async def test_rate_limit_next_answers_429_rate_limit(
    fake: FakeStripe, http: httpx.AsyncClient, client: stripe.StripeClient
) -> None:
    fake.rate_limit_next(2)

    limited = await http.get("/v1/account")
    with pytest.raises(stripe.RateLimitError):
        await client.v1.accounts.retrieve_current_async()
    allowed = await http.get("/v1/account")

    assert limited.status_code == 429
    error = limited.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "rate_limit")
    assert allowed.status_code == 200


async def test_sliding_rate_limit_refuses_requests_above_it_until_the_window_moves(
    fake: FakeStripe, http: httpx.AsyncClient
) -> None:
    fake.set_rate_limit(3)

    burst = await asyncio.gather(*(http.get("/v1/account") for _ in range(5)))
    await asyncio.sleep(1.05)
    after_window = await http.get("/v1/account")

    assert sorted(r.status_code for r in burst) == [200, 200, 200, 429, 429]
    assert after_window.status_code == 200


async def test_latency_delays_every_answer(fake: FakeStripe, http: httpx.AsyncClient) -> None:
    fake.set_latency(0.2)

    started = time.monotonic()
    response = await http.get("/v1/account")

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


async def test_requests_are_recorded_with_form_and_headers(
    fake: FakeStripe, http: httpx.AsyncClient
) -> None:
    await http.post(
        "/v1/customers", data={"metadata[member_id]": "mem_9"}, headers={"idempotency-key": "k"}
    )
    await http.get("/v1/customers", params={"limit": 1})

    [post, get] = fake.requests
    method, path, form, headers = post
    assert (method, path, form) == ("POST", "/v1/customers", {"metadata": {"member_id": "mem_9"}})
    assert headers["idempotency-key"] == "k"
    assert (get.method, get.form) == ("GET", {"limit": "1"})
    assert fake.count("POST", "/v1/customers") == fake.count("GET", "/v1/customers") == 1
    assert fake.count(None, "/v1/checkout") == 0


# --------------------------------------------------------------------------- events


def test_event_has_stripe_event_shape() -> None:
    session = checkout_session_completed(customer="cus_1", metadata={"member_id": "mem_1"})

    event = make_event("checkout.session.completed", session, event_id="evt_1", created=1700)

    assert event == {
        "id": "evt_1",
        "object": "event",
        "api_version": API_VERSION,
        "created": 1700,
        "data": {"object": session},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "checkout.session.completed",
    }
    assert make_event("invoice.paid", invoice())["id"].startswith("evt_")


def test_signed_event_verifies_with_the_stripe_library() -> None:
    event = make_event("invoice.paid", invoice(customer="cus_1", amount_due=2500))

    body, headers = signed(event, WEBHOOK_SECRET)

    assert json.loads(body) == event
    assert stripe.WebhookSignature.verify_header(body, headers["Stripe-Signature"], WEBHOOK_SECRET)
    constructed = stripe.Webhook.construct_event(body, headers["Stripe-Signature"], WEBHOOK_SECRET)
    assert (constructed.id, constructed.type) == (event["id"], "invoice.paid")
    assert constructed.data.object["amount_paid"] == 2500


def test_signed_bytes_are_signed_as_given_and_tampering_or_age_fails() -> None:
    raw = b'{"id": "evt_raw", "object": "event"}'
    body, headers = signed(raw, WEBHOOK_SECRET, timestamp=int(time.time()) - 600)

    assert body == raw
    with pytest.raises(stripe.SignatureVerificationError, match="tolerance"):
        stripe.Webhook.construct_event(body, headers["Stripe-Signature"], WEBHOOK_SECRET)
    assert stripe.WebhookSignature.verify_header(body, headers["Stripe-Signature"], WEBHOOK_SECRET)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(
            body + b" ", headers["Stripe-Signature"], WEBHOOK_SECRET
        )
    _, other = signed(raw, "whsec_another_secret")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(body, other["Stripe-Signature"], WEBHOOK_SECRET)


def test_invoice_builder_fills_lines_and_subscription_details() -> None:
    built = invoice(
        customer="cus_1",
        subscription="sub_1",
        billing_reason="subscription_create",
        amount_due=1500,
        price_id="price_gold",
        period_start=100,
        period_end=200,
        subscription_metadata={"plan_id": "plan_gold"},
    )

    assert (built["object"], built["status"], built["amount_paid"]) == ("invoice", "paid", 1500)
    assert built["id"].startswith("in_")
    assert built["payment_intent"].startswith("pi_")
    assert built["charge"].startswith("ch_")
    [line] = built["lines"]["data"]
    assert line["price"]["id"] == "price_gold"
    assert line["period"] == {"start": 100, "end": 200}
    assert built["subscription_details"] == {"metadata": {"plan_id": "plan_gold"}}
    unpaid = invoice(status="open")
    assert (unpaid["amount_paid"], unpaid["payment_intent"], unpaid["charge"]) == (0, None, None)


def test_charge_and_subscription_builders() -> None:
    refunded = charge(amount=1500, amount_refunded=1500, email="ada@example.com")
    partial = charge(amount=1500, amount_refunded=500)
    cancelling = subscription(customer="cus_1", cancel_at_period_end=True, current_period_end=999)

    assert (refunded["object"], refunded["refunded"]) == ("charge", True)
    assert refunded["billing_details"]["email"] == "ada@example.com"
    assert partial["refunded"] is False
    assert refunded["id"].startswith("ch_")
    assert (cancelling["object"], cancelling["status"]) == ("subscription", "active")
    assert (cancelling["cancel_at_period_end"], cancelling["current_period_end"]) == (True, 999)
    assert cancelling["id"].startswith("sub_")
