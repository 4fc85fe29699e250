"""OneDrive and SharePoint document libraries as object storage, through Microsoft Graph.

The app signs in as itself (client credentials: tenant, client id and secret, an app
registration granted `Files.ReadWrite.All` or `Sites.ReadWrite.All`). Its token is kept in
memory, per integration and credentials, until five minutes before it expires.

Objects live under one folder of one drive (a user's OneDrive or a SharePoint document
library, by drive id); a key's "/" separators are sub-folders, which Graph creates on the
way. Files up to 4 MB go in one `PUT …/content`; larger ones through an upload session,
in parts that are multiples of 320 KiB, one part in memory at a time. Graph shows the file
only once its last byte has arrived, so an upload that fails is never visible half-written;
a part whose answer was lost is not sent blindly again: the session says which bytes it
still expects (`nextExpectedRanges`) and the upload goes on from there.

Downloads read the item's pre-authenticated download URL in ranges into a temporary file
beside the target, renamed into place once complete. Listings follow `@odata.nextLink`.
Every call goes through the integration's gateway, whose policy waits out Graph's 429 and
503 answers for as long as their `Retry-After` asks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import quote

import httpx
from pydantic import Field, StringConstraints, field_validator

from memberhub.integrations.gateway import VENDOR_POLICIES, GatewayError, GatewayPolicy
from memberhub.integrations.providers.base import (
    BaseConfig,
    BaseCredentials,
    Capability,
    Connection,
    ConnectionFailed,
    Provider,
    StoredObject,
)

GRAPH_URL = "https://graph.microsoft.com/v1.0"
LOGIN_URL = "https://login.microsoftonline.com"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
# Graph's limit for a simple upload; larger files need an upload session.
SIMPLE_UPLOAD_MAX_BYTES = 4 * 1024 * 1024
# Upload session parts must be multiples of 320 KiB, at most 60 MiB.
PART_UNIT_BYTES = 320 * 1024
MAX_PART_BYTES = 60 * 1024 * 1024
DEFAULT_PART_BYTES = 32 * PART_UNIT_BYTES  # 10 MiB, within Graph's advice of 5-10 MiB
DOWNLOAD_RANGE_BYTES = 8 * 1024 * 1024
# A token is renewed this long before it expires.
TOKEN_MARGIN_SECONDS = 300
# How often one upload may look up its session and go on after a failed part.
MAX_RESUMES = 8
LIST_PAGE = 200
# Characters OneDrive and SharePoint refuse in file and folder names.
_FORBIDDEN_NAME_CHARS = re.compile(r'["*:<>?\\|\x00-\x1f]')

Secret = Annotated[str, StringConstraints(strip_whitespace=True, min_length=8, max_length=500)]
# A GUID, or a verified domain such as contoso.onmicrosoft.com.
TenantId = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]{0,99}$"),
]
Guid = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True,
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    ),
]


class GraphError(Exception):
    """Microsoft Graph refused an operation; the message carries its error code and words."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def _check_segments(path: str, what: str) -> str:
    segments = path.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ValueError(f"{what} {path!r} has an empty, '.' or '..' segment")
        if _FORBIDDEN_NAME_CHARS.search(segment):
            raise ValueError(f'{what} {path!r} has a character OneDrive refuses (" * : < > ? \\ |)')
        if segment != segment.strip() or segment.endswith("."):
            raise ValueError(f"{what} {path!r} has a name ending in a space or a dot")
    return path


class OneDriveConfig(BaseConfig):
    drive_id: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9!_.-]+$",
        description="The drive's id: a user's OneDrive (`GET /users/{user}/drive`) or a "
        "SharePoint document library (`GET /sites/{site-id}/drives`).",
    )
    folder: str = Field(
        default="",
        max_length=400,
        description='The folder, from the drive\'s root, that keys are relative to ("" for '
        'the root), e.g. "memberhub/exports".',
    )
    login_url: str = Field(
        default=LOGIN_URL,
        max_length=2048,
        pattern=r"^https?://",
        description="The Microsoft identity platform's address (another for national clouds).",
    )
    part_size_bytes: int = Field(
        default=DEFAULT_PART_BYTES,
        ge=PART_UNIT_BYTES,
        le=MAX_PART_BYTES,
        description="The size of each part of an upload session: a multiple of 327,680 bytes "
        "(320 KiB), at most 60 MiB.",
    )

    @field_validator("folder")
    @classmethod
    def _folder(cls, value: str) -> str:
        folder = value.strip().strip("/")
        return _check_segments(folder, "folder") if folder else ""

    @field_validator("part_size_bytes")
    @classmethod
    def _part_size(cls, value: int) -> int:
        if value % PART_UNIT_BYTES:
            raise ValueError("must be a multiple of 327680 bytes (320 KiB)")
        return value


class OneDriveCredentials(BaseCredentials):
    tenant_id: TenantId = Field(description="The directory (tenant) id or a verified domain.")
    client_id: Guid = Field(description="The app registration's application (client) id.")
    client_secret: Secret = Field(description="A client secret of the app registration.")


@dataclass
class _Token:
    value: str
    expires_at: float  # Unix seconds


@dataclass(frozen=True)
class _Item:
    """A drive item as a listing or a lookup shows it."""

    name: str
    size: int
    etag: str | None
    is_folder: bool
    download_url: str | None


class OneDrive(Provider):
    name = "onedrive"
    title = "OneDrive and SharePoint"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.STORAGE})
    config_model = OneDriveConfig
    credentials_model = OneDriveCredentials
    base_url = GRAPH_URL
    policy: ClassVar[GatewayPolicy] = VENDOR_POLICIES["microsoft_graph"]

    def __init__(self) -> None:
        # Access tokens by integration and credentials: a changed secret gets a new token.
        self._tokens: dict[tuple[str, str], _Token] = {}

    def outbound_urls(self, config: BaseConfig) -> dict[str, str]:
        assert isinstance(config, OneDriveConfig)
        if config.login_url == LOGIN_URL:  # Microsoft's own, as the base URL's default is
            return {}
        return {"config.login_url": config.login_url}  # the client secret is posted there

    # ------------------------------------------------------------ authentication

    def _token_key(self, connection: Connection) -> tuple[str, str]:
        credentials = connection.credentials
        material = "\n".join(
            str(credentials.get(name, "")) for name in ("tenant_id", "client_id", "client_secret")
        )
        return connection.integration_id, hashlib.sha256(material.encode()).hexdigest()

    async def _token(self, connection: Connection, *, renew: bool = False) -> str:
        key = self._token_key(connection)
        cached = self._tokens.get(key)
        if not renew and cached is not None and time.time() < cached.expires_at:
            return cached.value
        config = _config(connection)
        credentials = connection.credentials
        tenant = str(credentials.get("tenant_id") or "")
        if not tenant or not credentials.get("client_id") or not credentials.get("client_secret"):
            raise ConnectionFailed("set credentials.tenant_id, client_id and client_secret")
        url = f"{config.login_url.rstrip('/')}/{quote(tenant, safe='')}/oauth2/v2.0/token"
        response = await connection.gateway.request(
            "POST",
            url,
            data={
                "grant_type": "client_credentials",
                "client_id": str(credentials["client_id"]),
                "client_secret": str(credentials["client_secret"]),
                "scope": GRAPH_SCOPE,
            },
            # Asking for a token twice does no harm.
            retry_safe=True,
        )
        answer = _json_or_none(response)
        if response.status_code != 200 or not isinstance(answer, dict):
            error = answer.get("error") if isinstance(answer, dict) else None
            description = answer.get("error_description") if isinstance(answer, dict) else None
            # The description's first line names the problem (AADSTS code and words).
            first_line = str(description or "").splitlines()[0][:300] if description else ""
            raise ConnectionFailed(
                f"the Microsoft identity platform refused the app's credentials "
                f"({response.status_code} {error or 'error'}): {first_line}".rstrip(": ")
            )
        token = answer.get("access_token")
        lifetime = answer.get("expires_in")
        if not isinstance(token, str) or not token:
            raise ConnectionFailed("the Microsoft identity platform's answer has no access_token")
        seconds = float(lifetime) if isinstance(lifetime, int | float | str) else 3600.0
        self._tokens[key] = _Token(token, time.time() + max(0.0, seconds - TOKEN_MARGIN_SECONDS))
        return token

    async def _graph(
        self,
        connection: Connection,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        retry_safe: bool = False,
    ) -> httpx.Response:
        """One authenticated Graph call; a 401 renews the token and sends it once more."""
        for attempt in range(2):
            token = await self._token(connection, renew=attempt > 0)
            response = await connection.gateway.request(
                method,
                path,
                json=json,
                content=content,
                params=params,
                headers={**(headers or {}), "Authorization": f"Bearer {token}"},
                retry_safe=retry_safe,
            )
            if response.status_code != 401:
                return response
        return response

    async def check_connection(self, connection: Connection) -> str:
        config = _config(connection)
        response = await self._graph(connection, "GET", f"/drives/{quote(config.drive_id)}")
        if response.status_code != 200:
            raise ConnectionFailed(_graph_message(response, "reading the drive"))
        drive = _json_or_none(response) or {}
        kind = drive.get("driveType") or "drive"
        name = drive.get("name") or config.drive_id
        return f"connected to the {kind} drive {name!r}"

    # ------------------------------------------------------------ ObjectStorage

    async def upload_file(
        self, connection: Connection, key: str, path: Path, *, content_type: str
    ) -> StoredObject:
        item_path = _item_path(connection, key)
        size = (await asyncio.to_thread(path.stat)).st_size
        if size <= SIMPLE_UPLOAD_MAX_BYTES:
            response = await self._graph(
                connection,
                "PUT",
                f"{item_path}:/content",
                content=await asyncio.to_thread(path.read_bytes),
                headers={"Content-Type": content_type or "application/octet-stream"},
                params={"@microsoft.graph.conflictBehavior": "replace"},
            )
            if response.status_code not in (200, 201):
                raise GraphError(
                    _graph_message(response, f"uploading {key!r}"), status=response.status_code
                )
            return _stored(key, response, size)
        return await self._upload_in_parts(connection, key, item_path, path, size)

    async def _upload_in_parts(
        self, connection: Connection, key: str, item_path: str, path: Path, size: int
    ) -> StoredObject:
        part_size = _config(connection).part_size_bytes
        upload_url = await self._start_session(connection, key, item_path)
        resumes = 0
        offset = 0
        try:
            while True:
                part = await asyncio.to_thread(
                    _read_part, path, offset, min(part_size, size - offset)
                )
                end = offset + len(part) - 1
                try:
                    # The upload URL is pre-authenticated: it takes no Authorization.
                    response = await connection.gateway.request(
                        "PUT",
                        upload_url,
                        content=part,
                        headers={
                            "Content-Range": f"bytes {offset}-{end}/{size}",
                            "Content-Type": "application/octet-stream",
                        },
                    )
                except GatewayError:
                    # Graph may have kept some or all of the part: ask it.
                    resumes += 1
                    if resumes > MAX_RESUMES:
                        raise
                    expected = await self._expected_offset(connection, upload_url, key)
                    if expected is None:
                        return await self._completed(connection, key, item_path, size)
                    offset = expected
                    continue
                status = response.status_code
                if status in (200, 201):
                    return _stored(key, response, size)
                if status == 404 and end + 1 == size and resumes:
                    # The last part arrived on an earlier attempt whose answer was lost:
                    # the session closed with the file complete.
                    return await self._completed(connection, key, item_path, size)
                if status == 202:
                    answer = _json_or_none(response) or {}
                    offset = _first_expected(answer.get("nextExpectedRanges"), end + 1)
                    continue
                if status in (409, 416) and resumes < MAX_RESUMES:
                    # The part overlaps bytes Graph already has (an earlier attempt
                    # arrived): go on from what it still expects.
                    resumes += 1
                    expected = await self._expected_offset(connection, upload_url, key)
                    if expected is None:
                        return await self._completed(connection, key, item_path, size)
                    offset = expected
                    continue
                raise GraphError(
                    _graph_message(response, f"uploading part of {key!r}"), status=status
                )
        except BaseException:
            await self._cancel_session(connection, upload_url)
            raise

    async def _start_session(self, connection: Connection, key: str, item_path: str) -> str:
        response = await self._graph(
            connection,
            "POST",
            f"{item_path}:/createUploadSession",
            json={"item": {"@microsoft.graph.conflictBehavior": "replace"}},
            # A second session is harmless: the unused one expires.
            retry_safe=True,
        )
        answer = _json_or_none(response)
        if response.status_code != 200 or not isinstance(answer, dict):
            raise GraphError(
                _graph_message(response, f"starting an upload of {key!r}"),
                status=response.status_code,
            )
        upload_url = answer.get("uploadUrl")
        if not isinstance(upload_url, str) or not upload_url.startswith(("https://", "http://")):
            raise GraphError(f"Microsoft Graph gave no upload URL for {key!r}")
        return upload_url

    async def _expected_offset(
        self, connection: Connection, upload_url: str, key: str
    ) -> int | None:
        """Where the session wants the next part; None when it is gone (complete)."""
        response = await connection.gateway.request("GET", upload_url)
        if response.status_code == 404:
            return None
        answer = _json_or_none(response)
        if response.status_code != 200 or not isinstance(answer, dict):
            raise GraphError(
                _graph_message(response, f"resuming the upload of {key!r}"),
                status=response.status_code,
            )
        ranges = answer.get("nextExpectedRanges")
        if not ranges:
            raise GraphError(f"the upload session of {key!r} expects no more bytes")
        return _first_expected(ranges, 0)

    async def _completed(
        self, connection: Connection, key: str, item_path: str, size: int
    ) -> StoredObject:
        item = await self._item(connection, item_path)
        if item is None or item.is_folder or item.size != size:
            raise GraphError(f"the upload session of {key!r} ended without the file")
        return StoredObject(key=key, size=item.size, etag=item.etag)

    async def _cancel_session(self, connection: Connection, upload_url: str) -> None:
        try:
            await connection.gateway.request("DELETE", upload_url)
        except Exception:
            return  # the session expires by itself anyway

    async def download_file(self, connection: Connection, key: str, path: Path) -> None:
        item = await self._item(connection, _item_path(connection, key))
        if item is None or item.is_folder:
            raise FileNotFoundError(key)
        partial = path.with_name(f".{path.name}.partial")
        try:
            await asyncio.to_thread(partial.write_bytes, b"")
            offset = 0
            while offset < item.size:
                end = min(offset + DOWNLOAD_RANGE_BYTES, item.size) - 1
                response = await self._read_range(connection, key, item, offset, end)
                if response.status_code == 200:
                    # The range was ignored: this is the whole file.
                    await asyncio.to_thread(partial.write_bytes, response.content)
                    break
                await asyncio.to_thread(_append, partial, response.content)
                offset += len(response.content)
            await asyncio.to_thread(os.replace, partial, path)
        finally:
            await asyncio.to_thread(partial.unlink, missing_ok=True)

    async def _read_range(
        self, connection: Connection, key: str, item: _Item, start: int, end: int
    ) -> httpx.Response:
        headers = {"Range": f"bytes={start}-{end}"}
        if item.download_url:
            response = await connection.gateway.request("GET", item.download_url, headers=headers)
        else:
            response = await self._graph(
                connection, "GET", f"{_item_path(connection, key)}:/content", headers=headers
            )
        if response.status_code == 404:
            raise FileNotFoundError(key)
        if response.status_code not in (200, 206) or (
            response.status_code == 206 and not response.content
        ):
            raise GraphError(
                _graph_message(response, f"downloading {key!r}"), status=response.status_code
            )
        return response

    async def list_objects(self, connection: Connection, prefix: str) -> list[StoredObject]:
        # The deepest folder the prefix names whole, and what names in it must start with.
        folder, _, _name_start = prefix.rpartition("/")
        if folder:
            _check_segments(folder, "prefix")
        found: list[StoredObject] = []
        await self._walk(connection, folder, prefix, found)
        return sorted(found, key=lambda stored: stored.key)

    async def _walk(
        self, connection: Connection, folder: str, prefix: str, found: list[StoredObject]
    ) -> None:
        root = _config(connection).folder
        full = "/".join(part for part in (root, folder) if part)
        drive = f"/drives/{quote(_config(connection).drive_id)}"
        url = f"{drive}/root:/{_quoted(full)}:/children" if full else f"{drive}/root/children"
        params: dict[str, Any] | None = {"$top": LIST_PAGE}
        while url:
            response = await self._graph(connection, "GET", url, params=params)
            if response.status_code == 404:
                return  # no such folder: nothing under it
            answer = _json_or_none(response)
            if response.status_code != 200 or not isinstance(answer, dict):
                raise GraphError(
                    _graph_message(response, f"listing {folder or '/'!r}"),
                    status=response.status_code,
                )
            for raw in answer.get("value") or []:
                item = _item(raw)
                if item is None:
                    continue
                key = f"{folder}/{item.name}" if folder else item.name
                if item.is_folder:
                    # Descend where keys under it can start with the prefix.
                    if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                        await self._walk(connection, key, prefix, found)
                elif key.startswith(prefix):
                    found.append(StoredObject(key=key, size=item.size, etag=item.etag))
            next_link = answer.get("@odata.nextLink")
            url = next_link if isinstance(next_link, str) and next_link else ""
            params = None  # the next link carries its own query

    async def delete_object(self, connection: Connection, key: str) -> None:
        response = await self._graph(
            connection, "DELETE", _item_path(connection, key), retry_safe=True
        )
        if response.status_code not in (200, 204, 404):
            raise GraphError(
                _graph_message(response, f"deleting {key!r}"), status=response.status_code
            )

    async def _item(self, connection: Connection, item_path: str) -> _Item | None:
        response = await self._graph(connection, "GET", item_path)
        if response.status_code == 404:
            return None
        answer = _json_or_none(response)
        if response.status_code != 200 or not isinstance(answer, dict):
            raise GraphError(
                _graph_message(response, "reading an item"), status=response.status_code
            )
        return _item(answer)


def _read_part(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as source:
        source.seek(offset)
        return source.read(length)


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as target:
        target.write(data)


def _config(connection: Connection) -> OneDriveConfig:
    config = connection.config
    assert isinstance(config, OneDriveConfig)
    return config


def _quoted(path: str) -> str:
    return "/".join(quote(segment, safe="") for segment in path.split("/"))


def _item_path(connection: Connection, key: str) -> str:
    """The Graph path of the item a key names: `/drives/{id}/root:/{folder}/{key}`."""
    _check_segments(key, "key")
    config = _config(connection)
    full = f"{config.folder}/{key}" if config.folder else key
    return f"/drives/{quote(config.drive_id)}/root:/{_quoted(full)}"


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _graph_message(response: httpx.Response, doing: str) -> str:
    """Graph's own words, from its error shape `{"error": {"code", "message"}}`."""
    answer = _json_or_none(response)
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        code, message = error.get("code") or "error", str(error.get("message") or "")[:300]
    else:
        code, message = "error", response.text[:300]
    return f"Microsoft Graph answered {response.status_code} {code} {doing}: {message}".rstrip(": ")


def _first_expected(ranges: Any, default: int) -> int:
    """The start of the first range Graph still expects ("26-", "0-25")."""
    if isinstance(ranges, list) and ranges and isinstance(ranges[0], str):
        start = ranges[0].split("-", 1)[0]
        if start.isdigit():
            return int(start)
    return default


def _item(raw: Any) -> _Item | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return None
    size = raw.get("size")
    download_url = raw.get("@microsoft.graph.downloadUrl")
    return _Item(
        name=raw["name"],
        size=size if isinstance(size, int) and not isinstance(size, bool) else 0,
        etag=raw.get("eTag") if isinstance(raw.get("eTag"), str) else None,
        is_folder="folder" in raw,
        download_url=download_url if isinstance(download_url, str) else None,
    )


def _stored(key: str, response: httpx.Response, size: int) -> StoredObject:
    answer = _json_or_none(response)
    item = _item(answer)
    return StoredObject(
        key=key,
        size=item.size if item is not None and item.size else size,
        etag=item.etag if item is not None else None,
    )
