"""A CRM of the organisation's own, described by its base URL, auth type and endpoints
(seed 003's custom CRM):

    "config": {
      "base_url": "https://api.customcrm.com/v2", "auth": "header", "auth_header": "X-API-Key",
      "endpoints": {"search": "/leads?email={email}", "create": "/leads",
                    "update": "/leads/{id}", "changes": "/leads"}
    }

A record not yet linked is looked up with `search` (when set) before it is created; a
linked one is updated at `update`. `changes` is read with `updated_since` (ISO 8601) and
`cursor` query parameters and answers `{"data": [...], "next_cursor": ...}` (the keys are
configurable); each record carries its id, email, change time and properties at its top
level.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints

from memberhub.crm.mapping import SyncSettings
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    ChangesPage,
    Connection,
    ContactRecord,
    CrmError,
    RemoteRecord,
    WriteResult,
    aware_time,
)
from memberhub.integrations.providers.generic import GenericHttp, HttpConfig
from memberhub.kit.types import Input

Template = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"^/[^\s]*$")]
Key = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,100}$")]


class Endpoints(Input):
    search: Template | None = Field(
        default=None, description="GET; `{email}` is replaced. Answers a list of records."
    )
    create: Template = Field(description="POST the properties; answers the record.")
    update: Template = Field(description="`{id}` is replaced; answers the record.")
    changes: Template | None = Field(default=None, description="GET changed records.")


class CustomCrmConfig(HttpConfig):
    endpoints: Endpoints
    update_method: Literal["PATCH", "PUT"] = "PATCH"
    records_key: Key = "data"
    next_cursor_key: Key = "next_cursor"
    id_field: Key = "id"
    email_field: Key = "email"
    updated_field: Key = "updated_at"
    sync: SyncSettings


class CustomCrm(GenericHttp):
    name = "custom_crm"
    title = "Custom CRM"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.CRM})
    config_model = CustomCrmConfig
    batch_size = 1
    consent_purpose = "crm"
    concurrency = 4

    def validate(self, config: BaseConfig, credentials: BaseCredentials) -> None:
        super().validate(config, credentials)
        assert isinstance(config, CustomCrmConfig)
        if "{id}" not in config.endpoints.update:
            raise ValueError("config.endpoints.update must contain {id}")
        if config.endpoints.search is not None and "{email}" not in config.endpoints.search:
            raise ValueError("config.endpoints.search must contain {email}")

    def default_objects(self) -> Mapping[str, str]:
        return {"members": "contacts", "leads": "leads"}

    def lists_all_records(self, connection: Connection) -> bool:
        """A new record is searched for by email, unless a push's listing of the CRM (its
        `changes` endpoint, when it has one) already says it is absent (crm/sync.py)."""
        config = connection.config
        return isinstance(config, CustomCrmConfig) and config.endpoints.changes is not None

    async def upsert_contacts(
        self, connection: Connection, object_name: str, records: Sequence[ContactRecord]
    ) -> list[WriteResult]:
        return [await self._upsert(connection, record) for record in records]

    async def _upsert(self, connection: Connection, record: ContactRecord) -> WriteResult:
        config = connection.config
        assert isinstance(config, CustomCrmConfig)
        record_id = record.external_id
        search = config.endpoints.search
        if record_id is None and search is not None and record.email and not record.absent:
            path = search.replace("{email}", urllib.parse.quote(record.email))
            response = await connection.gateway.request("GET", path)
            if response.status_code >= 400:
                raise CrmError(f"the search answered {response.status_code}")
            found = _items(response.json(), config.records_key)
            matches = [
                item
                for item in found
                if str(item.get(config.email_field, "")).lower() == record.email.lower()
            ]
            if matches and matches[0].get(config.id_field) is not None:
                record_id = str(matches[0][config.id_field])
        body = dict(record.properties)
        if record_id is not None:
            path = config.endpoints.update.replace("{id}", urllib.parse.quote(record_id, safe=""))
            response = await connection.gateway.request(
                config.update_method, path, json=body, retry_safe=True
            )
            created = False
        else:
            response = await connection.gateway.request("POST", config.endpoints.create, json=body)
            created = True
        if response.status_code >= 400:
            return WriteResult(
                record.key, None, error=f"{response.status_code}: {response.text[:300]}"
            )
        answer = response.json() if response.content else {}
        if isinstance(answer, dict) and isinstance(answer.get(config.records_key), dict):
            answer = answer[config.records_key]
        new_id = answer.get(config.id_field) if isinstance(answer, dict) else None
        if new_id is None and record_id is None:
            return WriteResult(record.key, None, error=f"the answer has no {config.id_field!r}")
        return WriteResult(
            record.key, str(new_id) if new_id is not None else record_id, created=created
        )

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
        assert isinstance(config, CustomCrmConfig)
        if config.endpoints.changes is None:
            return ChangesPage(records=[], next_page=None)
        params: dict[str, str] = {}
        if since is not None:
            params["updated_since"] = since.astimezone(UTC).isoformat().replace("+00:00", "Z")
        if page is not None:
            params["cursor"] = page
        response = await connection.gateway.request("GET", config.endpoints.changes, params=params)
        if response.status_code >= 400:
            raise CrmError(f"the changes endpoint answered {response.status_code}")
        answer = response.json()
        records = []
        for item in _items(answer, config.records_key):
            modified_at = aware_time(item.get(config.updated_field))
            records.append(
                RemoteRecord(
                    external_id=str(item.get(config.id_field)),
                    email=item.get(config.email_field) or None,
                    properties={name: item.get(name) for name in properties if name in item},
                    modified_at=modified_at,
                )
            )
        next_cursor = answer.get(config.next_cursor_key) if isinstance(answer, dict) else None
        return ChangesPage(records=records, next_page=str(next_cursor) if next_cursor else None)


def _items(answer: Any, key: str) -> list[dict[str, Any]]:
    items = answer.get(key) if isinstance(answer, dict) else answer
    if not isinstance(items, list):
        raise CrmError(f"the answer has no list under {key!r}")
    return [item for item in items if isinstance(item, dict)]
