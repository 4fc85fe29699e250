"""The fake Salesforce REST API answers as Salesforce does, over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.fakes.salesforce import (
    DATA_PATH,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_REFRESH_TOKEN,
    DEFAULT_TOKEN,
    FakeSalesforce,
    format_datetime,
    id18,
    running_fake_salesforce,
)

UPSERT_CONTACTS = f"{DATA_PATH}/composite/sobjects/Contact/Member_Id__c"
COLLECTIONS = f"{DATA_PATH}/composite/sobjects"
MAY_FIRST = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[FakeSalesforce]:
    # One server for the module; each test starts from reset().
    async with running_fake_salesforce() as fake:
        yield fake


@pytest.fixture
def fake(running: FakeSalesforce) -> FakeSalesforce:
    running.reset()
    running.add_field("Contact", "Member_Id__c", external_id=True)
    running.add_field("Contact", "Tier__c")
    return running


@pytest.fixture
async def http(fake: FakeSalesforce) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {DEFAULT_TOKEN}"}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers, timeout=10) as client:
        yield client


def contact(member_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "attributes": {"type": "Contact"},
        "Member_Id__c": member_id,
        "LastName": "Lovelace",
        **fields,
    }


async def upsert(
    http: httpx.AsyncClient, records: list[dict[str, Any]], all_or_none: bool = False
) -> httpx.Response:
    return await http.patch(UPSERT_CONTACTS, json={"allOrNone": all_or_none, "records": records})


async def query(http: httpx.AsyncClient, soql: str, **headers: str) -> httpx.Response:
    return await http.get(f"{DATA_PATH}/query", params={"q": soql}, headers=headers)


# --------------------------------------------------------------------------- upsert


async def test_upsert_creates_then_updates_by_external_id_case_insensitively(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    first = await upsert(http, [contact("mem_1", Email="ada@example.com"), contact("mem_2")])
    second = await upsert(http, [contact("MEM_1", FirstName="Ada")])

    assert first.status_code == 200
    created = first.json()
    assert [r["created"] for r in created] == [True, True]
    assert all(r["success"] and r["errors"] == [] for r in created)
    assert all(len(r["id"]) == 18 and r["id"].startswith("003") for r in created)
    assert second.json() == [
        {"id": created[0]["id"], "success": True, "errors": [], "created": False}
    ]
    record = fake.records("Contact")[created[0]["id"]]
    assert (record["FirstName"], record["Email"], record["Name"]) == (
        "Ada",
        "ada@example.com",
        "Ada Lovelace",
    )
    assert record["OwnerId"].startswith("005")
    assert fake.writes() == 2
    assert first.headers["sforce-limit-info"].startswith("api-usage=1/")


async def test_upsert_partial_failures_answer_per_record_errors_in_input_order(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    response = await upsert(
        http,
        [
            contact("mem_1"),
            contact("mem_2", LastName=None),
            contact("mem_3", Email="not-an-email"),
            contact("", FirstName="No key"),
        ],
    )

    ok, missing, bad_email, no_key = response.json()
    assert ok["success"] is True
    assert missing == {
        "success": False,
        "errors": [
            {
                "statusCode": "REQUIRED_FIELD_MISSING",
                "message": "Required fields are missing: [LastName]",
                "fields": ["LastName"],
            }
        ],
    }
    assert bad_email["errors"][0]["statusCode"] == "INVALID_EMAIL_ADDRESS"
    assert bad_email["errors"][0]["fields"] == ["Email"]
    assert no_key["errors"][0]["statusCode"] == "MISSING_ARGUMENT"
    assert list(fake.records("Contact")) == [ok["id"]]
    assert fake.writes() == 1


async def test_all_or_none_rolls_back_every_record_and_marks_the_valid_ones(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    existing = fake.add_record("Contact", {"LastName": "Old", "Member_Id__c": "mem_1"})
    before = fake.records("Contact")

    response = await upsert(
        http, [contact("mem_1", LastName="New"), contact("mem_2", LastName="")], all_or_none=True
    )

    rolled_back, failed = response.json()
    assert response.status_code == 200
    assert rolled_back == {
        "success": False,
        "errors": [
            {
                "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                "message": "Record rolled back because not all records were valid and the "
                "request was using AllOrNone header",
                "fields": [],
            }
        ],
    }
    assert failed["errors"][0]["statusCode"] == "REQUIRED_FIELD_MISSING"
    assert fake.records("Contact") == before
    assert fake.record_by("Contact", "Member_Id__c", "mem_1") == before[existing]
    assert fake.writes() == 0


async def test_more_than_200_records_is_refused_whole(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    response = await upsert(http, [contact(f"mem_{i}") for i in range(201)])

    assert response.status_code == 400
    [error] = response.json()
    assert error["errorCode"] == "EXCEEDED_ID_LIMIT"
    assert fake.records("Contact") == {}


async def test_unknown_field_anywhere_refuses_the_whole_request(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    response = await upsert(http, [contact("mem_1"), contact("mem_2", Nickname__c="x")])

    assert response.status_code == 400
    assert response.json() == [
        {
            "message": "No such column 'Nickname__c' on sobject of type Contact",
            "errorCode": "INVALID_FIELD",
        }
    ]
    assert fake.records("Contact") == {}


async def test_upsert_needs_an_external_id_field(http: httpx.AsyncClient) -> None:
    not_external = await http.patch(
        f"{COLLECTIONS}/Contact/Tier__c", json={"records": [contact("mem_1", Tier__c="gold")]}
    )
    missing = await http.patch(f"{COLLECTIONS}/Contact/Nope__c", json={"records": []})

    assert not_external.status_code == 400
    assert not_external.json()[0]["errorCode"] == "INVALID_FIELD"
    assert missing.status_code == 404
    assert missing.json()[0]["errorCode"] == "NOT_FOUND"


async def test_duplicate_external_ids_in_one_request_fail_both_records(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    response = await upsert(http, [contact("mem_1"), contact("MEM_1"), contact("mem_2")])

    first, second, third = response.json()
    assert first["errors"][0]["statusCode"] == second["errors"][0]["statusCode"]
    assert first["errors"][0]["statusCode"] == "DUPLICATE_EXTERNAL_ID"
    assert third["success"] is True
    assert len(fake.records("Contact")) == 1


async def test_upsert_by_email_matches_case_insensitively_and_refuses_ambiguous_matches(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    ada = fake.add_record("Lead", {"LastName": "L", "Company": "C", "Email": "ada@example.com"})
    fake.add_record("Lead", {"LastName": "A", "Company": "C", "Email": "twin@example.com"})
    fake.add_record("Lead", {"LastName": "B", "Company": "C", "Email": "TWIN@example.com"})
    lead = {"attributes": {"type": "Lead"}, "LastName": "L", "Company": "C"}

    response = await http.patch(
        f"{COLLECTIONS}/Lead/Email",
        json={
            "records": [
                {**lead, "Email": "ADA@example.com", "Status": "Working - Contacted"},
                {**lead, "Email": "twin@example.com"},
                {**lead, "Email": "new@example.com", "Status": "Nope"},
            ]
        },
    )

    updated, ambiguous, bad_status = response.json()
    assert (updated["id"], updated["created"]) == (ada, False)
    assert fake.records("Lead")[ada]["Status"] == "Working - Contacted"
    assert ambiguous["errors"][0]["statusCode"] == "DUPLICATE_EXTERNAL_ID"
    assert bad_status["errors"][0]["statusCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"


async def test_lead_needs_company_and_defaults_status(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    response = await http.post(
        COLLECTIONS,
        json={
            "records": [
                {"attributes": {"type": "Lead"}, "LastName": "L"},
                {"attributes": {"type": "Lead"}, "LastName": "L", "Company": "Acme"},
            ]
        },
    )

    no_company, created = response.json()
    assert no_company["errors"][0]["fields"] == ["Company"]
    assert created["id"].startswith("00Q")
    assert fake.records("Lead")[created["id"]]["Status"] == "Open - Not Contacted"


async def test_external_id_is_unique_across_updates(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    fake.add_record("Contact", {"LastName": "A", "Member_Id__c": "mem_1"})
    other = fake.add_record("Contact", {"LastName": "B", "Member_Id__c": "mem_2"})

    response = await http.patch(
        COLLECTIONS,
        json={
            "records": [{"attributes": {"type": "Contact"}, "id": other, "Member_Id__c": "MEM_1"}]
        },
    )

    assert response.json()[0]["errors"][0]["statusCode"] == "DUPLICATE_VALUE"


# --------------------------------------------------------------------------- create, update, single


async def test_create_and_update_collections_and_single_record_resources(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    fake.set_now(MAY_FIRST)
    created = await http.post(COLLECTIONS, json={"records": [contact("mem_1")]})
    [result] = created.json()
    fake.set_now(MAY_FIRST + timedelta(minutes=5))
    updated = await http.patch(
        COLLECTIONS,
        json={
            "records": [
                {"attributes": {"type": "Contact"}, "id": result["id"], "Phone": "0123"},
                {"attributes": {"type": "Contact"}, "id": "003RO0000000000ZZZ", "Phone": "1"},
                {"attributes": {"type": "Contact"}, "Phone": "1"},
            ]
        },
    )
    patched = await http.patch(
        f"{DATA_PATH}/sobjects/Contact/{result['id']}", json={"Description": "VIP"}
    )
    fetched = await http.get(f"{DATA_PATH}/sobjects/Contact/{result['id'][:15]}")
    some = await http.get(
        f"{DATA_PATH}/sobjects/Contact/{result['id']}", params={"fields": "Id,Phone"}
    )
    missing = await http.get(f"{DATA_PATH}/sobjects/Contact/003RO0000000000ZZZ")
    invalid = await http.patch(f"{DATA_PATH}/sobjects/Contact/{result['id']}", json={"Email": "x"})

    assert created.status_code == 200
    assert result == {"id": result["id"], "success": True, "errors": []}
    ok, unknown, no_id = updated.json()
    assert ok["success"] is True
    assert unknown["success"] is False
    assert no_id["errors"][0]["statusCode"] == "MISSING_ARGUMENT"
    assert patched.status_code == 204
    body = fetched.json()
    assert body["attributes"] == {
        "type": "Contact",
        "url": f"{DATA_PATH}/sobjects/Contact/{result['id']}",
    }
    assert (body["Phone"], body["Description"], body["IsDeleted"]) == ("0123", "VIP", False)
    assert body["CreatedDate"] == "2024-05-01T12:00:00.000+0000"
    assert body["SystemModstamp"] == "2024-05-01T12:05:00.000+0000"
    assert set(some.json()) == {"attributes", "Id", "Phone"}
    assert missing.status_code == 404
    assert missing.json() == [
        {"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}
    ]
    assert invalid.status_code == 400
    assert invalid.json()[0]["errorCode"] == "INVALID_EMAIL_ADDRESS"
    assert fake.writes() == 3


async def test_read_only_fields_cannot_be_written(http: httpx.AsyncClient) -> None:
    response = await http.post(
        COLLECTIONS, json={"records": [contact("mem_1", CreatedDate="2024-01-01T00:00:00Z")]}
    )

    assert response.json()[0]["errors"][0]["statusCode"] == "INVALID_FIELD_FOR_INSERT_UPDATE"


def test_id18_adds_the_case_checksum() -> None:
    assert id18("001A0000006Vm9r") == "001A0000006Vm9rIAC"


# --------------------------------------------------------------------------- queries


async def test_query_filters_orders_and_limits(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    for minute, name in enumerate(["Cole", "adams", "Baker", "Drake"]):
        fake.add_record(
            "Contact",
            {"LastName": name, "Email": f"{name.lower()}@example.com"},
            modstamp=MAY_FIRST + timedelta(minutes=minute),
        )
    fake.add_record("Contact", {"LastName": "Nomail"}, modstamp=MAY_FIRST)

    ordered = await query(
        http,
        "select LastName, systemmodstamp FROM Contact WHERE SystemModstamp > 2024-05-01T12:00:00Z "
        "AND LastName != 'drake' ORDER BY LastName DESC LIMIT 5",
    )
    by_email = await query(
        http,
        "SELECT Id, Email FROM Contact WHERE Email IN ('ADAMS@example.com', 'cole@example.com')",
    )
    nulls = await query(
        http,
        "SELECT LastName FROM Contact WHERE SystemModstamp >= 2024-05-01T12:00:00.000+0000 "
        "ORDER BY Email, LastName",
    )
    no_email = await query(http, "SELECT LastName FROM Contact WHERE Email = null")

    body = ordered.json()
    assert (body["totalSize"], body["done"]) == (2, True)
    assert "nextRecordsUrl" not in body
    assert [r["LastName"] for r in body["records"]] == ["Baker", "adams"]
    assert body["records"][0]["SystemModstamp"] == "2024-05-01T12:02:00.000+0000"
    assert set(body["records"][0]) == {"attributes", "LastName", "SystemModstamp"}
    assert sorted(r["Email"] for r in by_email.json()["records"]) == [
        "adams@example.com",
        "cole@example.com",
    ]
    assert [r["LastName"] for r in nulls.json()["records"]] == [
        "Nomail",
        "adams",
        "Baker",
        "Cole",
        "Drake",
    ]
    assert [r["LastName"] for r in no_email.json()["records"]] == ["Nomail"]
    assert fake.count("GET", f"{DATA_PATH}/query") == 4
    assert fake.writes() == 0


async def test_query_pages_a_snapshot_with_the_batch_size_header(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    # Many records sharing one SystemModstamp, as after a bulk edit in Salesforce.
    ids = [
        fake.add_record("Contact", {"LastName": f"L{i}"}, modstamp=MAY_FIRST) for i in range(450)
    ]

    first = await query(
        http,
        "SELECT Id FROM Contact WHERE SystemModstamp >= 2024-05-01T12:00:00Z "
        "ORDER BY SystemModstamp",
        **{"Sforce-Query-Options": "batchSize=200"},
    )
    fake.add_record("Contact", {"LastName": "Later"}, modstamp=MAY_FIRST)
    fake.update_record("Contact", ids[-1], {"LastName": "Edited"})
    pages = [first.json()]
    while not pages[-1]["done"]:
        more = await http.get(pages[-1]["nextRecordsUrl"])
        assert more.status_code == 200
        pages.append(more.json())
    expired = await http.get(first.json()["nextRecordsUrl"].rsplit("/", 1)[0] + "/01gNOPE-200")

    assert [len(p["records"]) for p in pages] == [200, 200, 50]
    assert all(p["totalSize"] == 450 for p in pages)
    assert pages[0]["nextRecordsUrl"].startswith(f"{DATA_PATH}/query/01g")
    assert [r["Id"] for p in pages for r in p["records"]] == ids
    assert expired.status_code == 400
    assert expired.json()[0]["errorCode"] == "INVALID_QUERY_LOCATOR"


async def test_default_batch_is_2000(fake: FakeSalesforce, http: httpx.AsyncClient) -> None:
    for i in range(2001):
        fake.add_record("Contact", {"LastName": f"L{i}"})

    body = (await query(http, "SELECT Id FROM Contact")).json()

    assert (len(body["records"]), body["done"], body["totalSize"]) == (2000, False, 2001)


async def test_update_record_is_seen_by_modstamp_queries(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    record_id = fake.add_record("Contact", {"LastName": "A"}, modstamp=MAY_FIRST)
    edited_at = MAY_FIRST + timedelta(hours=1, milliseconds=7)
    fake.update_record("Contact", record_id, {"Phone": "555"}, modstamp=edited_at)

    response = await query(
        http, f"SELECT Id, Phone FROM Contact WHERE SystemModstamp > {format_datetime(MAY_FIRST)}"
    )

    [record] = response.json()["records"]
    assert (record["Id"], record["Phone"]) == (record_id, "555")
    assert fake.records("Contact")[record_id]["SystemModstamp"] == edited_at
    assert fake.record_by("Contact", "Phone", "555") is not None


@pytest.mark.parametrize(
    ("soql", "error_code"),
    [
        ("SELECT FROM Contact", "MALFORMED_QUERY"),
        ("SELECT Id FROM Contact WHERE", "MALFORMED_QUERY"),
        ("SELECT Id FROM Contact LIMIT many", "MALFORMED_QUERY"),
        ("SELECT Id FROM Contact WHERE LastName = 'a' OR LastName = 'b'", "MALFORMED_QUERY"),
        ("SELECT Nope FROM Contact", "INVALID_FIELD"),
        ("SELECT Id FROM Account", "INVALID_TYPE"),
        (
            "SELECT Id FROM Contact WHERE SystemModstamp > '2024-05-01T12:00:00Z'",
            "INVALID_QUERY_FILTER_OPERATOR",
        ),
        (
            "SELECT Id FROM Contact WHERE Email = 2024-05-01T12:00:00Z",
            "INVALID_QUERY_FILTER_OPERATOR",
        ),
    ],
)
async def test_bad_soql_is_refused(http: httpx.AsyncClient, soql: str, error_code: str) -> None:
    response = await query(http, soql)

    assert response.status_code == 400
    assert response.json()[0]["errorCode"] == error_code


# --------------------------------------------------------------------------- auth


async def test_missing_or_expired_token_is_invalid_session(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as anonymous:
        no_token = await anonymous.get(f"{DATA_PATH}/query", params={"q": "SELECT Id FROM Lead"})
    fake.expire_token()
    expired = await query(http, "SELECT Id FROM Lead")

    expected = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    assert (no_token.status_code, no_token.json()) == (401, expected)
    assert (expired.status_code, expired.json()) == (401, expected)
    assert fake.count() == 0
    assert fake.count_all() == 2


async def test_refresh_token_grant_issues_a_working_token(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    fake.expire_token()
    async with httpx.AsyncClient(base_url=fake.url) as client:
        granted = await client.post(
            "/services/oauth2/token",
            data={
                "grant_type": "refresh_token",
                "client_id": DEFAULT_CLIENT_ID,
                "client_secret": DEFAULT_CLIENT_SECRET,
                "refresh_token": DEFAULT_REFRESH_TOKEN,
            },
        )
        wrong = await client.post(
            "/services/oauth2/token",
            data={
                "grant_type": "refresh_token",
                "client_id": DEFAULT_CLIENT_ID,
                "client_secret": DEFAULT_CLIENT_SECRET,
                "refresh_token": "stale",
            },
        )
        token = granted.json()["access_token"]
        works = await client.get(
            f"{DATA_PATH}/sobjects/Contact/003RO0000000000ZZZ",
            headers={"authorization": f"Bearer {token}"},
        )

    body = granted.json()
    assert granted.status_code == 200
    assert set(body) == {
        "access_token",
        "instance_url",
        "id",
        "token_type",
        "issued_at",
        "signature",
        "scope",
    }
    assert (body["instance_url"], body["token_type"]) == (fake.url, "Bearer")
    assert fake.access_token == token
    assert wrong.status_code == 400
    assert wrong.json() == {
        "error": "invalid_grant",
        "error_description": "expired access/refresh token",
    }
    assert works.status_code == 404


# --------------------------------------------------------------------------- limits and failures


async def test_daily_limit_refuses_beyond_it_and_reports_usage(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    fake.set_daily_limit(2)

    answers = [await query(http, "SELECT Id FROM Contact") for _ in range(3)]

    assert [a.status_code for a in answers] == [200, 200, 403]
    assert answers[1].headers["sforce-limit-info"] == "api-usage=2/2"
    assert answers[2].json() == [
        {"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}
    ]
    assert fake.count() == 2
    assert fake.count_all() == 3


async def test_rate_limit_next_answers_like_the_concurrent_request_limit(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    fake.rate_limit_next(1)

    limited = await upsert(http, [contact("mem_1")])
    retried = await upsert(http, [contact("mem_1")])

    assert limited.status_code == 403
    assert limited.json() == [
        {
            "message": "ConcurrentPerOrgLongTxn Limit exceeded.",
            "errorCode": "REQUEST_LIMIT_EXCEEDED",
        }
    ]
    assert "retry-after" not in limited.headers
    assert retried.json()[0]["created"] is True
    assert len(fake.records("Contact")) == 1


async def test_sliding_rate_limit_refuses_until_the_window_moves(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    fake.set_rate_limit(3, window_seconds=0.5)

    burst = await asyncio.gather(*(query(http, "SELECT Id FROM Lead") for _ in range(5)))
    await asyncio.sleep(0.55)
    after = await query(http, "SELECT Id FROM Lead")

    assert sorted(r.status_code for r in burst) == [200, 200, 200, 403, 403]
    assert after.status_code == 200


async def test_injected_failures_leave_state_unchanged(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    fake.fail_next(1, status=503)
    fake.fail_next(1)

    unavailable = await upsert(http, [contact("mem_1")])
    unknown = await upsert(http, [contact("mem_1")])
    assert fake.records("Contact") == {}
    succeeded = await upsert(http, [contact("mem_1")])

    assert unavailable.status_code == 503
    assert unavailable.json()[0]["errorCode"] == "SERVER_UNAVAILABLE"
    assert unknown.status_code == 500
    assert unknown.json()[0]["errorCode"] == "UNKNOWN_EXCEPTION"
    assert succeeded.json()[0]["created"] is True
    assert fake.count("PATCH", UPSERT_CONTACTS) == 1
    assert fake.count_all("PATCH", UPSERT_CONTACTS) == 3
    assert [r.status for r in fake.requests] == [503, 500, 200]
    assert fake.writes() == 1


async def test_random_failures_are_reproducible_for_a_seed(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    async def statuses() -> list[int]:
        return [(await query(http, "SELECT Id FROM Lead")).status_code for _ in range(30)]

    fake.random_failures(0.5, seed=7)
    first = await statuses()
    fake.random_failures(0.5, seed=7)
    second = await statuses()
    fake.random_failures(0)
    after = await statuses()

    assert first == second
    assert set(first) - {200} <= {500, 502, 503}
    assert 0 < first.count(200) < 30
    assert set(after) == {200}


async def test_latency_delays_every_answer(fake: FakeSalesforce, http: httpx.AsyncClient) -> None:
    fake.set_latency(0.2)

    started = time.monotonic()
    response = await query(http, "SELECT Id FROM Lead")

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


async def test_requests_are_logged_with_query_and_body(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    await upsert(http, [contact("mem_1")])
    await query(http, "SELECT Id FROM Contact")
    bad = await http.patch(UPSERT_CONTACTS, content=b"{not json")

    patch, get, broken = fake.requests
    method, path, params, body, status = patch
    assert (method, path, params, status) == ("PATCH", UPSERT_CONTACTS, {}, 200)
    assert body["records"][0]["Member_Id__c"] == "mem_1"
    assert (get.query, get.body) == ({"q": "SELECT Id FROM Contact"}, None)
    assert bad.status_code == 400
    assert bad.json()[0]["errorCode"] == "JSON_PARSER_ERROR"
    assert broken.status == 400


async def test_ten_thousand_records_upsert_in_batches_and_page_back_quickly(
    fake: FakeSalesforce, http: httpx.AsyncClient
) -> None:
    records = [contact(f"mem_{i}", Email=f"m{i}@example.com") for i in range(10_000)]
    started = time.monotonic()
    for start in range(0, len(records), 200):
        response = await upsert(http, records[start : start + 200])
        assert all(r["success"] for r in response.json())
    ids: list[str] = []
    page = (await query(http, "SELECT Id FROM Contact")).json()
    ids += [r["Id"] for r in page["records"]]
    while not page["done"]:
        page = (await http.get(page["nextRecordsUrl"])).json()
        ids += [r["Id"] for r in page["records"]]

    assert len(set(ids)) == 10_000
    assert fake.writes() == 50
    assert time.monotonic() - started < 30
