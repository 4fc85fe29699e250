"""Algolia: a hosted search index written through its indexing API.

Records are written with `POST /1/indexes/{index}/batch`, at most 1,000 operations and
about 9 MB per request (within Algolia's advice for batches), as `updateObject` (add or
replace by objectID) and `deleteObject`: both may be sent twice without harm, so a batch
whose answer was lost is retried. Algolia applies a batch as a task; with `wait_for_tasks`
each write waits until its task is published.

A full rebuild follows Algolia's atomic reindexing: the index's settings, synonyms and
rules are copied to a temporary index, every record is written there, and the temporary
index is moved over the live one in one operation, so searches never see a half-built
index.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Annotated, Any, ClassVar
from urllib.parse import quote

import httpx
from pydantic import Field, StringConstraints

from memberhub.integrations.gateway import VENDOR_POLICIES, GatewayPolicy
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    Provider,
    SearchRecord,
)
from memberhub.search.settings import SearchSyncSettings

# Algolia's API clients send at most 1,000 operations per batch.
MAX_BATCH_OPERATIONS = 1000
# Batches are kept under ~9 MB of JSON, below the 10 MB a request may carry.
MAX_BATCH_BYTES = 9_000_000
TASK_POLL_FIRST_SECONDS = 0.1
TASK_POLL_MAX_SECONDS = 2.0
REINDEX_SUFFIX = "_memberhub_reindex"

ApplicationId = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9]{6,32}$")
]
ApiKey = Annotated[str, StringConstraints(strip_whitespace=True, min_length=16, max_length=200)]


class SearchIndexError(Exception):
    """Algolia refused a request; the message is its own (`{"message", "status"}`)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AlgoliaConfig(BaseConfig, SearchSyncSettings):
    wait_for_tasks: bool = Field(
        default=False,
        description="Wait until Algolia has published each batch before going on (slower; "
        "the sync's position then moves only past changes that are searchable).",
    )
    task_timeout_seconds: float = Field(default=60.0, ge=1.0, le=3600.0)
    batch_size: int = Field(
        default=MAX_BATCH_OPERATIONS,
        ge=1,
        le=MAX_BATCH_OPERATIONS,
        description="Operations per batch request (at most 1,000).",
    )


class AlgoliaCredentials(BaseCredentials):
    application_id: ApplicationId = Field(description="The Algolia application id.")
    api_key: ApiKey = Field(
        description="An API key with addObject, deleteObject, deleteIndex, listIndexes and "
        "settings ACLs (the admin key, or a key made for memberhub)."
    )


class Algolia(Provider):
    name = "algolia"
    title = "Algolia"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.SEARCH_INDEX})
    config_model = AlgoliaConfig
    credentials_model = AlgoliaCredentials
    policy: ClassVar[GatewayPolicy] = VENDOR_POLICIES["algolia"]
    batch_size = MAX_BATCH_OPERATIONS

    def auth_headers(self, credentials: Mapping[str, Any]) -> dict[str, str]:
        application_id = credentials.get("application_id")
        api_key = credentials.get("api_key")
        if not application_id or not api_key:
            return {}
        return {"X-Algolia-Application-Id": str(application_id), "X-Algolia-API-Key": str(api_key)}

    async def check_connection(self, connection: Connection) -> str:
        response = await _call(connection, "GET", "/1/indexes", params={"page": 0})
        if response.status_code != 200:
            raise ConnectionFailed(_message(response))
        answer = _object(response)
        count = len(answer.get("items") or [])
        application_id = connection.credentials.get("application_id")
        return f"connected to Algolia application {application_id} ({count} indices)"

    # ------------------------------------------------------------ SearchIndex

    async def save_records(
        self, connection: Connection, index: str, records: Sequence[SearchRecord]
    ) -> None:
        operations = [
            {"action": "updateObject", "body": {**record.attributes, "objectID": record.object_id}}
            for record in records
        ]
        await self._write(connection, index, operations)

    async def delete_records(
        self, connection: Connection, index: str, object_ids: Sequence[str]
    ) -> None:
        operations = [
            {"action": "deleteObject", "body": {"objectID": object_id}} for object_id in object_ids
        ]
        await self._write(connection, index, operations)

    async def replace_records(
        self,
        connection: Connection,
        index: str,
        batches: AsyncIterator[Sequence[SearchRecord]],
    ) -> int:
        temporary = f"{index}{REINDEX_SUFFIX}"
        # Start from an empty temporary index carrying the live one's configuration (a
        # copy with a scope copies no records; a new live index has nothing to copy).
        await self._operation(connection, temporary, None)
        await self._operation(
            connection,
            index,
            {
                "operation": "copy",
                "destination": temporary,
                "scope": ["settings", "synonyms", "rules"],
            },
        )
        written = 0
        async for batch in batches:
            await self.save_records(connection, temporary, batch)
            written += len(batch)
        if not await self._operation(
            connection, temporary, {"operation": "move", "destination": index}
        ):
            # Nothing was written: the index is to be empty.
            await self._operation(connection, index, None)
        return written

    # ------------------------------------------------------------ requests

    async def _write(
        self, connection: Connection, index: str, operations: list[dict[str, Any]]
    ) -> None:
        config = _config(connection)
        for batch in _batches(operations, config.batch_size):
            response = await _call(
                connection,
                "POST",
                f"/1/indexes/{_quoted(index)}/batch",
                json={"requests": batch},
                # updateObject and deleteObject by objectID: sending twice does no harm.
                retry_safe=True,
            )
            if response.status_code != 200:
                raise SearchIndexError(_message(response), status=response.status_code)
            await self._maybe_wait(connection, index, _object(response).get("taskID"))

    async def _operation(
        self,
        connection: Connection,
        index: str,
        body: dict[str, Any] | None,
    ) -> bool:
        """Copy or move `index` (body), or delete it (None); False when it does not exist."""
        if body is None:
            response = await _call(
                connection, "DELETE", f"/1/indexes/{_quoted(index)}", retry_safe=True
            )
        else:
            response = await _call(
                connection,
                "POST",
                f"/1/indexes/{_quoted(index)}/operation",
                json=body,
                retry_safe=True,
            )
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise SearchIndexError(_message(response), status=response.status_code)
        # Index operations are always waited for: the next step depends on them.
        await self._wait(connection, index, _object(response))
        return True

    async def _maybe_wait(self, connection: Connection, index: str, task_id: Any) -> None:
        if _config(connection).wait_for_tasks and isinstance(task_id, int):
            await self._wait_for_task(connection, index, task_id)

    async def _wait(self, connection: Connection, index: str, answer: Mapping[str, Any]) -> None:
        task_id = answer.get("taskID")
        if isinstance(task_id, int):
            await self._wait_for_task(connection, index, task_id)

    async def _wait_for_task(self, connection: Connection, index: str, task_id: int) -> None:
        deadline = time.monotonic() + _config(connection).task_timeout_seconds
        pause = TASK_POLL_FIRST_SECONDS
        while True:
            response = await _call(connection, "GET", f"/1/indexes/{_quoted(index)}/task/{task_id}")
            if response.status_code != 200:
                raise SearchIndexError(_message(response), status=response.status_code)
            if _object(response).get("status") == "published":
                return
            if time.monotonic() >= deadline:
                raise SearchIndexError(f"Algolia task {task_id} of {index} was not published")
            await asyncio.sleep(pause)
            pause = min(pause * 2, TASK_POLL_MAX_SECONDS)


def _config(connection: Connection) -> AlgoliaConfig:
    config = connection.config
    assert isinstance(config, AlgoliaConfig)
    return config


def _base(connection: Connection) -> str:
    config = _config(connection)
    if config.base_url:
        return config.base_url.rstrip("/")
    application_id = str(connection.credentials.get("application_id") or "")
    if not application_id:
        raise ConnectionFailed("set credentials.application_id and credentials.api_key")
    return f"https://{application_id}.algolia.net"


async def _call(
    connection: Connection,
    method: str,
    path: str,
    *,
    json: Any = None,
    params: Mapping[str, Any] | None = None,
    retry_safe: bool = False,
) -> httpx.Response:
    return await connection.gateway.request(
        method, f"{_base(connection)}{path}", json=json, params=params, retry_safe=retry_safe
    )


def _quoted(index: str) -> str:
    return quote(index, safe="")


def _object(response: httpx.Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _message(response: httpx.Response) -> str:
    message = _object(response).get("message") or response.text[:300]
    return f"Algolia answered {response.status_code}: {str(message)[:500]}"


def _batches(operations: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Runs of at most `size` operations and MAX_BATCH_BYTES of JSON, in order."""
    batches: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    current_bytes = 0
    for operation in operations:
        weight = len(json.dumps(operation, separators=(",", ":"), default=str)) + 1
        if current and (len(current) >= size or current_bytes + weight > MAX_BATCH_BYTES):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(operation)
        current_bytes += weight
    if current:
        batches.append(current)
    return batches
