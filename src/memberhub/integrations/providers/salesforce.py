"""Salesforce: the CRM, over OAuth 2.0.

Records are written with the sObject Collections upsert (200 per request) keyed by an
external id field holding our id (`Memberhub_Id__c` by default; create it on Contact and
Lead as a unique external id): writing a record twice updates it, and a changed email
changes nothing about which record it is. Changes are read with SOQL ordered by
`SystemModstamp`, following `nextRecordsUrl`, whose query locator fixes the result set when
the query runs, so no page boundary can skip or repeat a record.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from pydantic import Field, StringConstraints, field_validator

from memberhub.crm.mapping import (
    FieldMap,
    ObjectSync,
    SyncSettings,
    person_fields,
    with_defaults,
)
from memberhub.integrations.gateway import VENDOR_POLICIES, GatewayPolicy
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    ChangesPage,
    Connection,
    ConnectionFailed,
    ContactRecord,
    CrmError,
    CrmRefusedEverything,
    OAuthSettings,
    Provider,
    RemoteRecord,
    WriteResult,
    aware_time,
    refuses_everything,
)

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000)]
ApiName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,79}$")]
_API_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,79}")

LEAD_STATUS = {
    "new": "Open - Not Contacted",
    "contacted": "Working - Contacted",
    "qualified": "Working - Contacted",
    "enrolled": "Closed - Converted",
    "lost": "Closed - Not Converted",
}


def default_sync() -> SyncSettings:
    """Seed 003's Salesforce table: members as Contacts, leads as Leads."""
    # Salesforce requires a last name; "[not provided]" is its own placeholder.
    person = person_fields(
        "Email", "FirstName", "LastName", "Phone", defaults={"last_name": "[not provided]"}
    )
    return SyncSettings(
        members=ObjectSync(
            object="Contact",
            fields=[
                *person,
                FieldMap(source="tier", target="Memberhub_Tier__c"),
                FieldMap(source="points_balance", target="Memberhub_Points_Balance__c"),
                FieldMap(source="lifetime_points", target="Memberhub_Lifetime_Points__c"),
                FieldMap(source="member_since", target="Memberhub_Member_Since__c"),
                FieldMap(source="last_activity", target="Memberhub_Last_Activity__c"),
            ],
        ),
        leads=ObjectSync(
            object="Lead",
            fields=[
                *person,
                FieldMap(source="custom.company", target="Company", default="[not provided]"),
                FieldMap(source="source", target="LeadSource"),
                FieldMap(source="status", target="Status", direction="push", transform=LEAD_STATUS),
            ],
        ),
    )


class SalesforceConfig(BaseConfig):
    api_version: Annotated[str, StringConstraints(pattern=r"^v[0-9]{2}\.[0-9]$")] = "v60.0"
    external_id_field: ApiName = Field(
        default="Memberhub_Id__c",
        description="The external id field holding memberhub's id on every synced object.",
    )
    query_batch_size: int = Field(
        default=2000, ge=200, le=2000, description="Records per page of a changes query."
    )
    sync: SyncSettings = Field(default_factory=default_sync)

    @field_validator("sync", mode="before")
    @classmethod
    def _default_mappings(cls, value: Any) -> Any:
        return with_defaults(value, default_sync)


class SalesforceCredentials(BaseCredentials):
    access_token: Secret | None = None
    refresh_token: Secret | None = None
    client_id: Secret | None = None
    client_secret: Secret | None = None


class Salesforce(Provider):
    name = "salesforce"
    title = "Salesforce"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.CRM})
    config_model = SalesforceConfig
    credentials_model = SalesforceCredentials
    # There is no shared API host: every org has its instance URL (config.base_url).
    base_url = None
    policy: ClassVar[GatewayPolicy] = VENDOR_POLICIES["salesforce"]
    oauth_defaults = OAuthSettings(
        authorize_url="https://login.salesforce.com/services/oauth2/authorize",
        token_url="https://login.salesforce.com/services/oauth2/token",
        scopes=["api", "refresh_token"],
    )
    batch_size = 200
    consent_purpose = "crm"
    concurrency = 4

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        assert isinstance(config, SalesforceConfig)
        if not config.base_url:
            raise ValueError("config.base_url must be the org's instance URL")
        for entity, spec in config.sync.objects():
            if not _API_NAME.fullmatch(spec.object):
                raise ValueError(f"sync.{entity}.object {spec.object!r} is not an object name")
            for field_map in spec.fields:
                if not _API_NAME.fullmatch(field_map.target):
                    raise ValueError(
                        f"sync.{entity}: {field_map.target!r} is not a Salesforce field name"
                    )
                if field_map.target.lower() == config.external_id_field.lower():
                    raise ValueError(
                        f"sync.{entity}: {field_map.target} holds memberhub's id; map another field"
                    )

    def default_objects(self) -> Mapping[str, str]:
        return {"members": "Contact", "leads": "Lead"}

    def _path(self, config: BaseConfig, rest: str) -> str:
        assert isinstance(config, SalesforceConfig)
        return f"/services/data/{config.api_version}{rest}"

    async def check_connection(self, connection: Connection) -> str:
        response = await connection.gateway.request("GET", self._path(connection.config, "/limits"))
        if response.status_code != 200:
            raise ConnectionFailed(
                f"Salesforce answered {response.status_code}: {response.text[:200]}"
            )
        return "connected to Salesforce"

    async def upsert_contacts(
        self, connection: Connection, object_name: str, records: Sequence[ContactRecord]
    ) -> list[WriteResult]:
        """Linked records are updated by their Id (a record that began in Salesforce has no
        memberhub id yet: it gets one now); the others are upserted on memberhub's id.

        An unlinked record whose email a record without a memberhub id already holds (one a
        Salesforce user created) is linked to it, not created again: upserting on our id
        alone would make a second Contact, as Salesforce does not key records by email."""
        config = connection.config
        assert isinstance(config, SalesforceConfig)
        key = config.external_id_field
        results: dict[str, WriteResult] = {}
        owners = await self._unclaimed_by_email(
            connection, object_name, [r.email for r in records if not r.external_id and r.email]
        )
        records_to_write = [
            dataclasses.replace(r, external_id=owners[r.email.lower()])
            if not r.external_id and r.email and r.email.lower() in owners
            else r
            for r in records
        ]
        linked = [r for r in records_to_write if r.external_id]
        unlinked = [r for r in records_to_write if not r.external_id]
        if linked:
            body = {
                "allOrNone": False,
                "records": [
                    {
                        "attributes": {"type": object_name},
                        **r.properties,
                        key: r.key,
                        "id": r.external_id,
                    }
                    for r in linked
                ],
            }
            response = await connection.gateway.request(
                "PATCH", self._path(config, "/composite/sobjects"), json=body, retry_safe=True
            )
            results.update(_results(linked, _answer(response)))
        if unlinked:
            body = {
                "allOrNone": False,
                "records": [
                    {"attributes": {"type": object_name}, **r.properties, key: r.key}
                    for r in unlinked
                ],
            }
            response = await connection.gateway.request(
                "PATCH",
                self._path(config, f"/composite/sobjects/{object_name}/{key}"),
                json=body,
                retry_safe=True,  # an upsert on our own id
            )
            results.update(_results(unlinked, _answer(response)))
        return [results[r.key] for r in records]

    async def _unclaimed_by_email(
        self, connection: Connection, object_name: str, emails: Sequence[str]
    ) -> dict[str, str]:
        """The Id of the oldest record holding each email (lower-cased) that carries no
        memberhub id; one query per few dozen emails (a GET's URL has a length limit)."""
        config = connection.config
        assert isinstance(config, SalesforceConfig)
        wanted = sorted({email.lower() for email in emails})
        found: dict[str, str] = {}
        for chunk in _chunks_by_length(wanted, LOOKUP_QUERY_CHARS):
            listed = ", ".join(_soql_string(email) for email in chunk)
            soql = (
                f"SELECT Id, Email FROM {object_name} WHERE Email IN ({listed}) "
                f"AND {config.external_id_field} = null ORDER BY CreatedDate, Id"
            )
            response = await connection.gateway.request(
                "GET", self._path(config, "/query"), params={"q": soql}
            )
            answer = _answer(response)
            if not isinstance(answer, dict):
                raise CrmError("Salesforce answered the lookup with an unexpected body")
            for item in answer.get("records") or []:
                if isinstance(item, dict) and item.get("Id") and item.get("Email"):
                    found.setdefault(str(item["Email"]).lower(), str(item["Id"]))
        return found

    async def changed_contacts(
        self,
        connection: Connection,
        object_name: str,
        *,
        since: datetime | None,
        page: str | None,
        properties: Sequence[str],
    ) -> ChangesPage:
        config = connection.config
        if page is not None:
            response = await connection.gateway.request("GET", page)  # the query locator
        else:
            fields = ["Id", "SystemModstamp", "Email"]
            fields += [p for p in properties if p not in fields]
            soql = f"SELECT {', '.join(fields)} FROM {object_name}"
            if since is not None:
                stamp = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
                    f"{since.microsecond // 1000:03d}Z"
                )
                soql += f" WHERE SystemModstamp >= {stamp}"
            soql += " ORDER BY SystemModstamp, Id"
            assert isinstance(config, SalesforceConfig)
            response = await connection.gateway.request(
                "GET",
                self._path(config, "/query"),
                params={"q": soql},
                headers={"Sforce-Query-Options": f"batchSize={config.query_batch_size}"},
            )
        answer = _answer(response)
        if not isinstance(answer, dict):
            raise CrmError("Salesforce answered the query with an unexpected body")
        records = [
            RemoteRecord(
                external_id=str(item["Id"]),
                email=item.get("Email") or None,
                properties={name: item.get(name) for name in properties if name in item},
                modified_at=_timestamp(item.get("SystemModstamp")),
            )
            for item in answer.get("records", [])
            if isinstance(item, dict) and item.get("Id")
        ]
        next_page = None if answer.get("done", True) else answer.get("nextRecordsUrl")
        return ChangesPage(records=records, next_page=next_page)


# Characters of email addresses per lookup query, well under a GET URL's limit (16,384).
LOOKUP_QUERY_CHARS = 8000


def _soql_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _chunks_by_length(values: Sequence[str], budget: int) -> list[list[str]]:
    chunks: list[list[str]] = []
    current: list[str] = []
    used = 0
    for value in values:
        if current and used + len(value) + 4 > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(value)
        used += len(value) + 4
    if current:
        chunks.append(current)
    return chunks


def _results(records: Sequence[ContactRecord], answer: Any) -> dict[str, WriteResult]:
    """sObject Collections answer one result per record, in order."""
    if not isinstance(answer, list) or len(answer) != len(records):
        raise CrmError("Salesforce answered the write with an unexpected body")
    results = {}
    for record, item in zip(records, answer, strict=True):
        if isinstance(item, dict) and item.get("success") and item.get("id"):
            results[record.key] = WriteResult(
                record.key, str(item["id"]), created=bool(item.get("created"))
            )
        else:
            errors = item.get("errors") if isinstance(item, dict) else None
            results[record.key] = WriteResult(record.key, None, error=_errors(errors))
    return results


def _answer(response: Any) -> Any:
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code >= 400:
        message = f"Salesforce answered {response.status_code}: {_errors(answer)}"
        # REQUEST_LIMIT_EXCEEDED (the org's daily API requests) comes with 403.
        if refuses_everything(response.status_code) or "REQUEST_LIMIT_EXCEEDED" in message:
            raise CrmRefusedEverything(message)
        raise CrmError(message)
    return answer


def _errors(errors: Any) -> str:
    if isinstance(errors, list) and errors:
        parts = []
        for error in errors[:5]:
            if isinstance(error, dict):
                code = error.get("statusCode") or error.get("errorCode") or "ERROR"
                parts.append(f"{code}: {error.get('message', '')}")
        if parts:
            return "; ".join(parts)[:500]
    return "no error details"


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        # 2024-05-01T12:00:00.000+0000
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f%z")
    except ValueError:
        return aware_time(value)
