"""HubSpot: connection (private-app token or OAuth), signed webhooks (v3) and the CRM.

Contacts are written with the batch endpoints (100 per request): records not yet linked by
`batch/upsert` with email as the id property, so a retry or a contact that already exists
never makes a duplicate; linked ones by `batch/update` on their HubSpot id, so a changed
email moves the contact rather than creating another. Changes are read with the search
endpoint on `lastmodifieddate`, a new query per page from the last change seen (its `after`
is an offset into a live result, and one query stops at 10,000 results).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar

from pydantic import Field, StringConstraints, field_validator

from memberhub.crm.mapping import (
    FieldMap,
    ObjectSync,
    SyncSettings,
    person_fields,
    with_defaults,
)
from memberhub.integrations import signatures
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
    InboundIdentity,
    InboundRequest,
    OAuthSettings,
    Provider,
    RemoteRecord,
    WriteResult,
    aware_time,
    refuses_everything,
)

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


def default_sync() -> SyncSettings:
    """Seed 003's HubSpot table, plus the loyalty values as custom contact properties
    (create `memberhub_*` properties in HubSpot, or remove them from the mapping)."""
    contact = person_fields("email", "firstname", "lastname", "phone")
    return SyncSettings(
        members=ObjectSync(
            object="contacts",
            fields=[
                *contact,
                FieldMap(source="tier", target="memberhub_tier"),
                FieldMap(source="points_balance", target="memberhub_points_balance"),
                FieldMap(source="lifetime_points", target="memberhub_lifetime_points"),
                FieldMap(source="member_since", target="memberhub_member_since"),
                FieldMap(source="last_activity", target="memberhub_last_activity"),
            ],
        ),
        leads=ObjectSync(
            object="contacts",
            fields=[
                *contact,
                FieldMap(
                    source="status",
                    target="hs_lead_status",
                    direction="push",
                    transform={
                        "new": "NEW",
                        "contacted": "ATTEMPTED_TO_CONTACT",
                        "qualified": "CONNECTED",
                        "enrolled": "OPEN_DEAL",
                        "lost": "UNQUALIFIED",
                    },
                ),
            ],
        ),
    )


class HubSpotConfig(BaseConfig):
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="The URL HubSpot calls, as configured in the app, when a proxy in front "
        "of memberhub changes it; it is part of the signed content.",
    )
    tolerance_seconds: int = Field(default=300, ge=30, le=3600)
    sync: SyncSettings = Field(default_factory=default_sync)

    @field_validator("sync", mode="before")
    @classmethod
    def _default_mappings(cls, value: Any) -> Any:
        return with_defaults(value, default_sync)


class HubSpotCredentials(BaseCredentials):
    access_token: Secret | None = Field(default=None, description="A private app's token.")
    client_id: Secret | None = None
    client_secret: Secret | None = Field(
        default=None, description="The app's client secret: OAuth and webhook signatures."
    )
    refresh_token: Secret | None = None


class HubSpot(Provider):
    name = "hubspot"
    title = "HubSpot"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.EVENTS_SOURCE, Capability.CRM}
    )
    batch_size = 100
    consent_purpose = "crm"
    concurrency = 4
    config_model = HubSpotConfig
    credentials_model = HubSpotCredentials
    base_url = "https://api.hubapi.com"
    policy: ClassVar[GatewayPolicy] = VENDOR_POLICIES["hubspot"]
    oauth_defaults = OAuthSettings(
        authorize_url="https://app.hubspot.com/oauth/authorize",
        token_url="https://api.hubapi.com/oauth/v1/token",
        scopes=["crm.objects.contacts.read", "crm.objects.contacts.write"],
    )

    async def check_connection(self, connection: Connection) -> str:
        if not connection.credentials.get("access_token"):
            raise ConnectionFailed("no access token: set credentials.access_token or connect OAuth")
        response = await connection.gateway.request(
            "GET", "/crm/v3/objects/contacts", params={"limit": 1}
        )
        if response.status_code != 200:
            raise ConnectionFailed(
                f"HubSpot answered {response.status_code}: {response.text[:200]}"
            )
        return "connected to HubSpot"

    def verify(
        self, request: InboundRequest, connection_secrets: Mapping[str, Any], config: BaseConfig
    ) -> None:
        assert isinstance(config, HubSpotConfig)
        secret = connection_secrets.get("client_secret")
        if not secret:
            raise signatures.SignatureInvalid(
                signatures.NO_MATCHING_SIGNATURE,
                "the integration has no credentials.client_secret to verify with",
            )
        headers = {k.lower(): v for k, v in request.headers.items()}
        signatures.verify_hubspot_v3(
            method=request.method,
            uri=config.webhook_url or request.url,
            body=request.body,
            signature=headers.get("x-hubspot-signature-v3"),
            timestamp_ms=headers.get("x-hubspot-request-timestamp"),
            secret=secret,
            now=request.now,
            tolerance=config.tolerance_seconds,
        )

    def identify(self, request: InboundRequest) -> InboundIdentity:
        """HubSpot posts a batch: a JSON array of events, each with `eventId`. A retried
        batch is the same bytes, so the batch is known by its events' ids."""
        events = json.loads(request.body)
        if not isinstance(events, list) or not events:
            raise ValueError("the body is not a HubSpot batch of events")
        ids: list[str] = []
        types: set[str] = set()
        for event in events:
            if not isinstance(event, dict) or "eventId" not in event:
                raise ValueError("a HubSpot event has no eventId")
            ids.append(str(event["eventId"]))
            types.add(str(event.get("subscriptionType", "unknown")))
        joined = ",".join(ids)
        event_id = (
            joined if len(joined) <= 200 else "batch-" + hashlib.sha256(joined.encode()).hexdigest()
        )
        event_type = types.pop() if len(types) == 1 else "batch"
        return InboundIdentity(event_id=event_id, event_type=event_type[:255])

    # ------------------------------------------------------------ CRM

    def default_objects(self) -> Mapping[str, str]:
        return {"members": "contacts", "leads": "contacts"}

    async def upsert_contacts(
        self, connection: Connection, object_name: str, records: Sequence[ContactRecord]
    ) -> list[WriteResult]:
        results: dict[str, WriteResult] = {}
        linked = [r for r in records if r.external_id]
        by_email = [r for r in records if not r.external_id and r.email]
        for record in records:
            if not record.external_id and not record.email:
                results[record.key] = WriteResult(record.key, None, error="no email to match by")
        base = f"/crm/v3/objects/{object_name}/batch"
        if linked:
            body = {"inputs": [{"id": r.external_id, "properties": _strings(r)} for r in linked]}
            answer = await _batch(connection, f"{base}/update", body)
            ok = {str(item.get("id")) for item in answer.get("results", [])}
            failed = _errors_by_id(answer)
            for record in linked:
                assert record.external_id is not None
                if record.external_id in ok:
                    results[record.key] = WriteResult(record.key, record.external_id)
                else:
                    error = failed.get(record.external_id, "HubSpot did not update the contact")
                    results[record.key] = WriteResult(record.key, None, error=error)
        if by_email:
            body = {
                "inputs": [
                    {"idProperty": "email", "id": r.email, "properties": _strings(r)}
                    for r in by_email
                ]
            }
            answer = await _batch(connection, f"{base}/upsert", body)
            found: dict[str, tuple[str, bool]] = {}
            for item in answer.get("results", []):
                email = str((item.get("properties") or {}).get("email") or "").lower()
                found[email] = (str(item.get("id")), bool(item.get("new")))
            failed = {k.lower(): v for k, v in _errors_by_id(answer).items()}
            for record in by_email:
                email = (record.email or "").lower()
                if email in found:
                    contact_id, new = found[email]
                    results[record.key] = WriteResult(record.key, contact_id, created=new)
                else:
                    error = failed.get(email, "HubSpot did not upsert the contact")
                    results[record.key] = WriteResult(record.key, None, error=error)
        return [results[r.key] for r in records]

    async def changed_contacts(
        self,
        connection: Connection,
        object_name: str,
        *,
        since: datetime | None,
        page: str | None,
        properties: Sequence[str],
    ) -> ChangesPage:
        # Each page is a new query from the last change seen, skipping the records already
        # read at that very time. Paging by `after` alone would go by offset into a live
        # result: a contact read already and edited meanwhile moves to its end, the rest
        # move up a place, and the one moved across the page boundary would never be read.
        # A new query per page also never meets the search's cap of 10,000 results.
        token = json.loads(page) if page else {}
        start_ms = token.get("since")
        if start_ms is None and since is not None:
            start_ms = _epoch_ms(since)
        skip = int(token.get("skip") or 0)
        body: dict[str, Any] = {
            "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
            "properties": sorted({*properties, "email", "lastmodifieddate"}),
            "limit": SEARCH_PAGE,
        }
        if start_ms is not None:
            body["filterGroups"] = [
                {
                    "filters": [
                        {
                            "propertyName": "lastmodifieddate",
                            "operator": "GTE",
                            "value": str(start_ms),
                        }
                    ]
                }
            ]
        if skip:
            body["after"] = str(skip)
        response = await connection.gateway.request(
            "POST", f"/crm/v3/objects/{object_name}/search", json=body, retry_safe=True
        )
        answer = _json(response)
        records = [_remote(item, properties) for item in answer.get("results", [])]
        next_page: str | None = None
        if ((answer.get("paging") or {}).get("next") or {}).get("after") is not None:
            stamps = [_epoch_ms(r.modified_at) for r in records if r.modified_at is not None]
            if not stamps:
                raise CrmError("HubSpot answered contacts without lastmodifieddate")
            last_ms = stamps[-1]
            at_last = sum(1 for stamp in stamps if stamp == last_ms)
            next_skip = skip + at_last if last_ms == start_ms else at_last
            if next_skip + SEARCH_PAGE > SEARCH_CAP:
                raise CrmError("more than 10,000 HubSpot contacts share one modification time")
            next_page = json.dumps({"since": last_ms, "skip": next_skip})
        return ChangesPage(records=records, next_page=next_page)

    def webhook_changes(self, event_type: str, payload: Any) -> list[tuple[str, RemoteRecord]]:
        """`contact.propertyChange` events, one partial record per contact: the batch's
        values, the latest of each property winning."""
        if not isinstance(payload, list):
            return []
        changes: dict[str, dict[str, Any]] = {}
        times: dict[str, int] = {}
        for event in sorted(
            (e for e in payload if isinstance(e, dict)), key=lambda e: e.get("occurredAt") or 0
        ):
            if event.get("subscriptionType") != "contact.propertyChange":
                continue
            object_id, name = event.get("objectId"), event.get("propertyName")
            if object_id is None or not isinstance(name, str):
                continue
            changes.setdefault(str(object_id), {})[name] = event.get("propertyValue")
            occurred = event.get("occurredAt")
            if isinstance(occurred, int):
                times[str(object_id)] = max(times.get(str(object_id), 0), occurred)
        return [
            (
                "contacts",
                RemoteRecord(
                    external_id=object_id,
                    email=properties.get("email") or None,
                    properties=properties,
                    modified_at=(
                        datetime.fromtimestamp(times[object_id] / 1000, UTC)
                        if object_id in times
                        else None
                    ),
                ),
            )
            for object_id, properties in changes.items()
        ]


SEARCH_PAGE = 200
SEARCH_CAP = 10_000


def _epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, exactly (a float timestamp can round 0.123 down)."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _strings(record: ContactRecord) -> dict[str, str]:
    """HubSpot takes every property value as a string; an empty string clears one."""
    values: dict[str, str] = {}
    for name, value in record.properties.items():
        if value is None:
            values[name] = ""
        elif isinstance(value, bool):
            values[name] = "true" if value else "false"
        else:
            values[name] = str(value)
    return values


def _json(response: Any) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code >= 400 or not isinstance(answer, dict):
        message = answer.get("message") if isinstance(answer, dict) else None
        text = f"HubSpot answered {response.status_code}: {message or response.text[:300]}"
        if refuses_everything(response.status_code):
            raise CrmRefusedEverything(text)
        raise CrmError(text)
    return answer


async def _batch(connection: Connection, path: str, body: dict[str, Any]) -> dict[str, Any]:
    # An upsert by email or an update to given values can be sent twice without harm.
    response = await connection.gateway.request("POST", path, json=body, retry_safe=True)
    return _json(response)


def _errors_by_id(answer: Mapping[str, Any]) -> dict[str, str]:
    """A 207's errors by the input id each names."""
    errors: dict[str, str] = {}
    for error in answer.get("errors") or []:
        if not isinstance(error, dict):
            continue
        message = f"{error.get('category', 'ERROR')}: {error.get('message', '')}"[:500]
        for input_id in (error.get("context") or {}).get("ids") or []:
            errors[str(input_id)] = message
    return errors


def _remote(item: Mapping[str, Any], wanted: Sequence[str]) -> RemoteRecord:
    properties = item.get("properties") or {}
    modified_at = aware_time(properties.get("lastmodifieddate") or item.get("updatedAt"))
    return RemoteRecord(
        external_id=str(item.get("id")),
        email=properties.get("email") or None,
        properties={name: properties.get(name) for name in wanted if name in properties},
        modified_at=modified_at,
    )
