"""Pipedrive: persons as the CRM, over API v2 with an API token or OAuth.

Pipedrive has no batch write for persons: a record not yet linked is looked up by email
(an exact search, or the push's listing of every person) and updated if found, created if
not, and its person id kept; a linked one is updated by id. Changes are read from the
persons list filtered by `updated_since` and ordered by update time, paged by Pipedrive's
cursor.

Mapped properties are a person's standard fields (`name`, `first_name`, `last_name`,
`email`, `phone`, `owner_id`) or a custom field's 40-character key.
"""

from __future__ import annotations

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
    OAuthSettings,
    Provider,
    RemoteRecord,
    WriteResult,
    aware_time,
)

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
STANDARD = frozenset({"name", "first_name", "last_name", "email", "phone", "owner_id"})
_CUSTOM_KEY = re.compile(r"[0-9a-f]{40}")
LIST_PAGE = 500


def default_sync() -> SyncSettings:
    """Seed 003's Pipedrive table, for persons (custom fields have account-specific keys,
    so the loyalty values are added by mapping them to a key)."""
    person = [
        *person_fields("email", "first_name", "last_name", "phone"),
        FieldMap(source="full_name", target="name"),
    ]
    return SyncSettings(
        members=ObjectSync(object="persons", fields=person),
        leads=ObjectSync(object="persons", fields=person, enabled=False),
    )


class PipedriveConfig(BaseConfig):
    page_size: int = Field(default=LIST_PAGE, ge=1, le=500, description="Persons per page read.")
    sync: SyncSettings = Field(default_factory=default_sync)

    @field_validator("sync", mode="before")
    @classmethod
    def _default_mappings(cls, value: Any) -> Any:
        return with_defaults(value, default_sync)


class PipedriveCredentials(BaseCredentials):
    api_token: Secret | None = None
    access_token: Secret | None = None
    refresh_token: Secret | None = None
    client_id: Secret | None = None
    client_secret: Secret | None = None


class Pipedrive(Provider):
    name = "pipedrive"
    title = "Pipedrive"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.CRM})
    config_model = PipedriveConfig
    credentials_model = PipedriveCredentials
    base_url = None  # each company has its domain: config.base_url
    policy: ClassVar[GatewayPolicy] = VENDOR_POLICIES["pipedrive"]
    oauth_defaults = OAuthSettings(
        authorize_url="https://oauth.pipedrive.com/oauth/authorize",
        token_url="https://oauth.pipedrive.com/oauth/token",
        scopes=["contacts:full"],
    )
    token_client_auth = "basic"  # its token endpoint requires the Authorization header
    batch_size = 1
    consent_purpose = "crm"
    concurrency = 8

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        assert isinstance(config, PipedriveConfig)
        assert isinstance(credentials, PipedriveCredentials)
        if not config.base_url:
            raise ValueError("config.base_url must be the company domain's URL")
        oauth_client = credentials.client_id and credentials.client_secret
        if not credentials.api_token and not credentials.access_token and not oauth_client:
            raise ValueError(
                "set credentials.api_token, or client_id and client_secret to connect by OAuth"
            )
        for entity, spec in config.sync.objects():
            if spec.object != "persons":
                raise ValueError(f"sync.{entity}.object must be persons")
            for field_map in spec.fields:
                if field_map.target not in STANDARD and not _CUSTOM_KEY.fullmatch(field_map.target):
                    raise ValueError(
                        f"sync.{entity}: {field_map.target!r} is neither a person field "
                        f"({', '.join(sorted(STANDARD))}) nor a custom field key"
                    )

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        if credentials.get("access_token"):
            return {"Authorization": f"Bearer {credentials['access_token']}"}
        if credentials.get("api_token"):
            return {"x-api-token": str(credentials["api_token"])}
        return {}

    def default_objects(self) -> Mapping[str, str]:
        return {"members": "persons", "leads": "persons"}

    async def check_connection(self, connection: Connection) -> str:
        response = await connection.gateway.request("GET", "/api/v2/persons", params={"limit": 1})
        if response.status_code != 200:
            raise ConnectionFailed(f"Pipedrive answered {response.status_code}")
        return "connected to Pipedrive"

    def lists_all_records(self, connection: Connection) -> bool:
        """No batch write by key: a new record is searched for by email, unless a push's
        listing of every person (crm/sync.py) already says it is absent."""
        return True

    async def upsert_contacts(
        self, connection: Connection, object_name: str, records: Sequence[ContactRecord]
    ) -> list[WriteResult]:
        return [await self._upsert(connection, record) for record in records]

    async def _upsert(self, connection: Connection, record: ContactRecord) -> WriteResult:
        body = _person_body(record.properties)
        person_id = record.external_id
        if person_id is None:
            if not record.email:
                return WriteResult(record.key, None, error="no email to match by")
            if not record.absent:
                person_id = await self._find(connection, record.email)
        if person_id is not None:
            if "emails" in body:
                emails = await self._emails_keeping_others(connection, record, person_id)
                if isinstance(emails, WriteResult):
                    return emails
                if emails is None:
                    del body["emails"]
                else:
                    body["emails"] = emails
            if not body:
                return WriteResult(record.key, person_id)
            response = await connection.gateway.request(
                "PATCH", f"/api/v2/persons/{person_id}", json=body, retry_safe=True
            )
            if response.status_code == 404:
                return WriteResult(record.key, None, error="the person was deleted in Pipedrive")
            if response.status_code >= 400:
                return WriteResult(record.key, None, error=_error(response))
            return WriteResult(record.key, person_id)
        body.setdefault("name", record.email)
        # A create is not sent twice after a server error: the next run searches first.
        response = await connection.gateway.request("POST", "/api/v2/persons", json=body)
        if response.status_code >= 400:
            return WriteResult(record.key, None, error=_error(response))
        data = response.json().get("data") or {}
        if data.get("id") is None:
            return WriteResult(record.key, None, error="Pipedrive answered without a person id")
        return WriteResult(record.key, str(data["id"]), created=True)

    async def _emails_keeping_others(
        self, connection: Connection, record: ContactRecord, person_id: str
    ) -> list[dict[str, Any]] | WriteResult | None:
        """The person's emails with the record's as primary: Pipedrive replaces the whole
        list on update, and the addresses its users added must stay. None when the primary
        is ours already (nothing to send); a failed result when the person can't be read."""
        email = record.properties.get("email")
        if not email:
            return []
        if record.crm_emails and record.crm_emails[0].lower() == str(email).lower():
            return None  # the listing just read them: no need to read the person again
        response = await connection.gateway.request("GET", f"/api/v2/persons/{person_id}")
        if response.status_code == 404:
            return WriteResult(record.key, None, error="the person was deleted in Pipedrive")
        if response.status_code >= 400:
            return WriteResult(record.key, None, error=_error(response))
        current = (response.json().get("data") or {}).get("emails") or []
        return _with_primary(current, str(email))

    async def _find(self, connection: Connection, email: str) -> str | None:
        response = await connection.gateway.request(
            "GET",
            "/api/v2/persons/search",
            params={"term": email, "fields": "email", "exact_match": "true", "limit": 1},
        )
        if response.status_code >= 400:
            raise CrmError(f"Pipedrive search answered {_error(response)}")
        items = ((response.json().get("data") or {}).get("items")) or []
        for entry in items:
            item = entry.get("item") or {}
            if email.lower() in [str(e).lower() for e in item.get("emails") or []]:
                return str(item["id"])
        return None

    async def changed_contacts(
        self,
        connection: Connection,
        object_name: str,
        *,
        since: datetime | None,
        page: str | None,
        properties: Sequence[str],
    ) -> ChangesPage:
        params: dict[str, Any] = {
            "sort_by": "update_time",
            "sort_direction": "asc",
            "limit": connection.config.page_size
            if isinstance(connection.config, PipedriveConfig)
            else LIST_PAGE,
        }
        if since is not None:
            params["updated_since"] = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if page is not None:
            params["cursor"] = page
        response = await connection.gateway.request("GET", "/api/v2/persons", params=params)
        if response.status_code >= 400:
            raise CrmError(f"Pipedrive answered {_error(response)}")
        answer = response.json()
        records = [_remote(person, properties) for person in answer.get("data") or []]
        next_cursor = (answer.get("additional_data") or {}).get("next_cursor")
        return ChangesPage(records=records, next_page=next_cursor or None)


def _person_body(properties: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for name, value in properties.items():
        if name == "email":
            body["emails"] = [{"value": value, "primary": True, "label": "work"}] if value else []
        elif name == "phone":
            body["phones"] = [{"value": value, "primary": True, "label": "work"}] if value else []
        elif name in STANDARD:
            body[name] = value
        else:
            custom[name] = value
    if custom:
        body["custom_fields"] = custom
    return body


def _with_primary(entries: Any, email: str) -> list[dict[str, Any]] | None:
    """`entries` (the person's emails) with `email` primary and every other address kept,
    no longer primary; None when `email` is the primary already."""
    kept: list[dict[str, Any]] = []
    ours: dict[str, Any] | None = None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not entry.get("value"):
            continue
        if str(entry["value"]).lower() == email.lower():
            if entry.get("primary") and str(entry["value"]) == email:
                return None
            ours = ours or entry
            continue
        label = entry.get("label")
        kept.append(
            {"value": entry["value"], "primary": False, **({"label": label} if label else {})}
        )
    label = (ours or {}).get("label") or "work"
    return [{"value": email, "primary": True, "label": label}, *kept]


def _primary(entries: Any) -> str | None:
    if not isinstance(entries, list) or not entries:
        return None
    primary = next((e for e in entries if isinstance(e, dict) and e.get("primary")), entries[0])
    value = primary.get("value") if isinstance(primary, dict) else primary
    return str(value) if value else None


def _remote(person: Mapping[str, Any], wanted: Sequence[str]) -> RemoteRecord:
    flat: dict[str, Any] = {
        "name": person.get("name"),
        "first_name": person.get("first_name"),
        "last_name": person.get("last_name"),
        "owner_id": person.get("owner_id"),
        "email": _primary(person.get("emails")),
        "phone": _primary(person.get("phones")),
        **(person.get("custom_fields") or {}),
    }
    modified_at = aware_time(person.get("update_time"))
    addresses = [
        str(entry.get("value") if isinstance(entry, dict) else entry)
        for entry in person.get("emails") or []
        if (entry.get("value") if isinstance(entry, dict) else entry)
    ]
    return RemoteRecord(
        external_id=str(person.get("id")),
        email=flat["email"],
        properties={name: flat.get(name) for name in wanted},
        modified_at=modified_at,
        other_emails=tuple(a for a in addresses if a != flat["email"]),
    )


def _error(response: Any) -> str:
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    message = answer.get("error") if isinstance(answer, dict) else None
    return f"{response.status_code}: {message or response.text[:300]}"
