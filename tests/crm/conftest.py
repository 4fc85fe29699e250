"""CRM sync tests: each vendor's fake, an integration pointed at it, members in bulk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

from memberhub.crm.models import SyncRun
from memberhub.integrations.hub import IntegrationHub
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.members.models import Member, MemberStatus
from memberhub.settings import Settings
from memberhub.webhooks.ssrf import UrlPolicy
from memberhub.worker.runner import Worker
from tests.fakes.custom_crm import contacts_fields, custom_crm_config, running_fake_custom_crm
from tests.fakes.hubspot import FakeHubSpot, running_fake_hubspot
from tests.fakes.pipedrive import FakePipedrive, running_fake_pipedrive
from tests.fakes.salesforce import FakeSalesforce, running_fake_salesforce
from tests.support import ApiClient, shortened_sleep

HUBSPOT_TOKEN = "pat-na1-00000000-0000-0000-0000-000000000001"
PIPEDRIVE_TOKEN = "0123456789abcdef0123456789abcdef01234567"
SALESFORCE_TOKEN = "00D000000000001!AQ4AQFakeSessionToken0001"
CUSTOM_KEY = "custom-crm-key-0123456789"
# Members pushed to a CRM have agreed to it (`crm` consent); the API's default is not.
CRM_CONSENT = {"crm": True}
# The fakes enforce no limit unless told to; a generous client-side limit keeps runs fast.
FAST = "2000 per second"
HUBSPOT_PROPERTIES = (
    "memberhub_tier",
    "memberhub_points_balance",
    "memberhub_lifetime_points",
    "memberhub_member_since",
    "memberhub_last_activity",
)
SALESFORCE_FIELDS = (
    "Memberhub_Tier__c",
    "Memberhub_Points_Balance__c",
    "Memberhub_Lifetime_Points__c",
    "Memberhub_Member_Since__c",
    "Memberhub_Last_Activity__c",
)


@dataclass
class Crm:
    """A running fake and how to connect an integration to it."""

    name: str
    fake: Any

    def integration_body(self, **sync: Any) -> dict[str, Any]:
        sync = {"coalesce_seconds": 0, "pull_lookback_seconds": 0, **sync}
        config: dict[str, Any] = {"base_url": self.fake.url, "rate_limit": FAST, "sync": sync}
        if self.name == "custom_crm":
            # No defaults for a CRM of one's own: its mapping is part of its description.
            fields = {"object": "contacts", "fields": contacts_fields()}
            sync = {"members": fields, "leads": fields, **sync}
            config = {**custom_crm_config(self.fake.url, **sync), "rate_limit": FAST}
            credentials = {"api_key": CUSTOM_KEY}
        elif self.name == "hubspot":
            credentials = {"access_token": HUBSPOT_TOKEN, "client_secret": "hubspot-app-secret"}
        elif self.name == "salesforce":
            credentials = {"access_token": SALESFORCE_TOKEN}
        else:
            credentials = {"api_token": PIPEDRIVE_TOKEN}
        return {
            "provider": self.name,
            "name": self.name.title(),
            "config": config,
            "credentials": credentials,
        }

    def records(self) -> dict[str, dict[str, Any]]:
        """The CRM's person records by id, as {email, first, last}."""
        if self.name == "hubspot":
            return {
                cid: {"email": p.get("email"), "first": p.get("firstname")}
                for cid, p in self.fake.contacts.items()
            }
        if self.name == "salesforce":
            return {
                rid: {"email": r.get("Email"), "first": r.get("FirstName")}
                for rid, r in self.fake.records("Contact").items()
            }
        if self.name == "custom_crm":
            return {
                cid: {"email": c.get("email"), "first": c.get("first_name")}
                for cid, c in self.fake.contacts.items()
            }
        return {
            str(pid): {
                "email": next((e["value"] for e in p.get("emails") or []), None),
                "first": p.get("first_name"),
            }
            for pid, p in self.fake.persons.items()
        }

    def writes(self) -> int:
        return int(self.fake.writes())


@pytest.fixture
async def hubspot() -> AsyncIterator[FakeHubSpot]:
    async with running_fake_hubspot(access_token=HUBSPOT_TOKEN) as fake:
        for name in HUBSPOT_PROPERTIES:
            fake.add_property(name)
        yield fake


@pytest.fixture
async def salesforce() -> AsyncIterator[FakeSalesforce]:
    async with running_fake_salesforce(access_token=SALESFORCE_TOKEN) as fake:
        add_salesforce_fields(fake)
        yield fake


def add_salesforce_fields(fake: FakeSalesforce) -> None:
    for obj in ("Contact", "Lead"):
        fake.add_field(obj, "Memberhub_Id__c", external_id=True)
    for name in SALESFORCE_FIELDS:
        fake.add_field("Contact", name)


@pytest.fixture
async def pipedrive() -> AsyncIterator[FakePipedrive]:
    async with running_fake_pipedrive(api_token=PIPEDRIVE_TOKEN) as fake:
        yield fake


@asynccontextmanager
async def running_crm(name: str) -> AsyncIterator[Crm]:
    """The named vendor's fake, running, with the custom properties and fields the default
    mappings write."""
    factory: Any = {
        "hubspot": running_fake_hubspot(access_token=HUBSPOT_TOKEN),
        "salesforce": running_fake_salesforce(access_token=SALESFORCE_TOKEN),
        "pipedrive": running_fake_pipedrive(api_token=PIPEDRIVE_TOKEN),
        "custom_crm": running_fake_custom_crm(api_key=CUSTOM_KEY),
    }[name]
    async with factory as fake:
        if name == "hubspot":
            for prop in HUBSPOT_PROPERTIES:
                fake.add_property(prop)
        elif name == "salesforce":
            add_salesforce_fields(fake)
        yield Crm(name, fake)


@pytest.fixture(params=["hubspot", "salesforce", "pipedrive", "custom_crm"])
async def crm(request: pytest.FixtureRequest) -> AsyncIterator[Crm]:
    async with running_crm(request.param) as running:
        yield running


@pytest.fixture
async def hub(settings: Settings, db: Database) -> AsyncIterator[IntegrationHub]:
    integrations = IntegrationHub(
        db,
        SecretBox(settings.resolved_secret_key),
        UrlPolicy.from_settings(settings),
        retry_sleep=shortened_sleep,
    )
    yield integrations
    await integrations.aclose()


async def create_integration(api: ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post("/api/v1/integrations", body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def tick(db: Database, hub: IntegrationHub) -> dict[str, int]:
    """One pass of the worker's jobs, CRM sync among them."""
    return await Worker(db, hub=hub).tick(force=True)


async def sync(
    api: ApiClient, db: Database, hub: IntegrationHub, integration_id: str, **body: Any
) -> dict[str, Any]:
    """Start a run through the API, let the worker run it, return it as the API shows it."""
    started = await api.post(f"/api/v1/integrations/{integration_id}/sync", body)
    assert started.status_code == 202, started.text
    await tick(db, hub)
    run = await api.get(f"/api/v1/sync-runs/{started.json()['id']}")
    assert run.status_code == 200, run.text
    return dict(run.json())


async def seed_members(
    db: Database, count: int, *, prefix: str = "bulk", crm_consent: bool = True
) -> list[str]:
    """`count` members written in one transaction (the API would take minutes for 10,000),
    with consent to be pushed to CRMs unless told otherwise."""
    now = utcnow()
    public_ids = []
    async with db.transaction() as session:
        for index in range(count):
            public_id = f"mem_{prefix}{index:08d}"
            email = f"{prefix}.{index}@example.com"
            session.add(
                Member(
                    public_id=public_id,
                    email=email,
                    email_normalized=email,
                    first_name=f"First{index}",
                    last_name=f"Last{index}",
                    status=MemberStatus.ACTIVE,
                    consent_crm=crm_consent,
                    custom_fields={},
                    external_ids={},
                    version=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            public_ids.append(public_id)
    return public_ids


async def last_changes_run(db: Database) -> SyncRun | None:
    async with db.transaction(read_only=True) as session:
        return await session.scalar(
            select(SyncRun).where(SyncRun.trigger == "changes").order_by(SyncRun.id.desc())
        )
