"""A stateful fake of Microsoft Graph's drive API and of the identity platform's token
endpoint, for the OneDrive/SharePoint storage provider.

`running_fake_graph` serves it on a free port of 127.0.0.1 (uvicorn in a thread, as the
other fakes), with the shapes of the real services:

    async with running_fake_graph() as fake:
        fake.add_app(TENANT, CLIENT_ID, SECRET)
        drive_id = fake.add_drive("Documents")
        fake.throttle_next(2, retry_after=3)
        ...point the integration at fake.graph_url and fake.login_url...
        assert fake.file(drive_id, "exports/members.csv") == b"..."

Token endpoint: `POST {login_url}/{tenant}/oauth2/v2.0/token` with the client credentials
grant (`client_id`, `client_secret`, `scope` ending in `/.default`); errors as the identity
platform writes them, `{"error", "error_description", "error_codes"}`.

Graph, under `/v1.0` with `Authorization: Bearer <token>`; errors as
`{"error": {"code", "message"}}`:
- `GET /drives/{drive-id}`: the drive.
- `GET /drives/{drive-id}/root:/{path}`: an item; files carry a pre-authenticated
  `@microsoft.graph.downloadUrl` (Range requests answered 206).
- `GET /drives/{drive-id}/root/children`, `…/root:/{path}:/children`: paged by `$top`
  (at most 200 here), the next page's absolute URL in `@odata.nextLink`.
- `PUT …/root:/{path}:/content`: a simple upload, refused over 4 MB (413); parent folders
  are created on the way.
- `POST …/root:/{path}:/createUploadSession`: an upload session whose `uploadUrl` is
  pre-authenticated (a `tempauth` query parameter). `PUT uploadUrl` with `Content-Range`
  takes the next part: it must start where the session expects (416 otherwise), be a
  multiple of 320 KiB unless it is the last, and at most 60 MiB; 202 with
  `nextExpectedRanges` until the last byte, then 201 (200 when it replaced a file) with the
  item. `GET uploadUrl` tells what the session still expects; `DELETE` cancels it. A part
  sent with an Authorization header is refused with 401, as Graph may do.
- `DELETE …/root:/{path}`: 204, 404 when absent.

Programming: `throttle_next` (429 or 503 with Retry-After), `fail_next` (500 before
anything happens), `interrupt_parts` (an upload part is kept, then answered 500: the
answer lost on the way back), `fail_parts` (upload parts refused, not kept),
`expire_tokens`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote

from starlette.requests import Request
from starlette.responses import Response

from tests.support_server import bind_local_socket, serving_in_thread

SIMPLE_UPLOAD_MAX_BYTES = 4 * 1024 * 1024
PART_UNIT_BYTES = 320 * 1024
MAX_PART_BYTES = 60 * 1024 * 1024
MAX_PAGE = 200
DEFAULT_PAGE = 200
GRAPH_SCOPE_SUFFIX = "/.default"


class GraphRequest(NamedTuple):
    method: str
    path: str
    query: str
    headers: dict[str, str]
    size: int


@dataclass
class _File:
    id: str
    content: bytes
    etag: str
    content_type: str
    modified_at: datetime


@dataclass
class _Drive:
    id: str
    name: str
    drive_type: str
    files: dict[str, _File] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)


@dataclass
class _Session:
    drive_id: str
    path: str
    token: str
    expires_at: datetime
    total: int | None = None
    received: bytearray = field(default_factory=bytearray)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def graph_error(status: int, code: str, message: str, **headers: str) -> Response:
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {"request-id": str(uuid.uuid4()), "date": _iso(_now())},
        }
    }
    return Response(json.dumps(body), status, media_type="application/json", headers=headers)


def identity_error(status: int, error: str, code: int, description: str) -> Response:
    body = {
        "error": error,
        "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {uuid.uuid4()}",
        "error_codes": [code],
        "timestamp": _now().strftime("%Y-%m-%d %H:%M:%SZ"),
    }
    return Response(json.dumps(body), status, media_type="application/json")


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, media_type="application/json")


class FakeGraph:
    """The fake's state, programming and what it has seen; safe to use from any thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.login_url = f"{url}/login"
        self.graph_url = f"{url}/v1.0"
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._apps: dict[tuple[str, str], str] = {}  # (tenant, client id) → secret
            self._tokens: dict[str, float] = {}  # token → expires at (Unix seconds)
            self._drives: dict[str, _Drive] = {}
            self._sessions: dict[str, _Session] = {}
            # download id → (tempauth, drive id, path)
            self._downloads: dict[str, tuple[str, str, str]] = {}
            self._requests: list[GraphRequest] = []
            self._throttled: deque[tuple[int, int]] = deque()
            self._failures: deque[int] = deque()
            self._interrupted_parts = 0
            self._failed_parts: deque[int] = deque()
            self._ids = itertools.count(1)
            self.token_lifetime = 3599
            self.tokens_issued = 0

    # ------------------------------------------------------------------ setup and programming

    def add_app(self, tenant: str, client_id: str, client_secret: str) -> None:
        with self._lock:
            self._apps[(tenant, client_id)] = client_secret

    def add_drive(self, name: str = "Documents", drive_type: str = "documentLibrary") -> str:
        drive_id = "b!" + secrets.token_urlsafe(24).replace("-", "A").replace("_", "B")
        with self._lock:
            self._drives[drive_id] = _Drive(drive_id, name, drive_type)
        return drive_id

    def throttle_next(self, n: int, *, retry_after: int = 1, status: int = 429) -> None:
        """Answer the next `n` Graph requests (upload URLs included) with 429 (or 503) and
        `Retry-After: retry_after`."""
        with self._lock:
            self._throttled.extend((status, retry_after) for _ in range(n))

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._failures.extend(status for _ in range(n))

    def interrupt_parts(self, n: int) -> None:
        """Keep the next `n` upload parts, then answer each with 500."""
        with self._lock:
            self._interrupted_parts += n

    def fail_parts(self, n: int, status: int = 500) -> None:
        """Answer the next `n` upload parts with `status` without keeping them."""
        with self._lock:
            self._failed_parts.extend(status for _ in range(n))

    def expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    # ------------------------------------------------------------------ inspection

    def file(self, drive_id: str, path: str) -> bytes | None:
        with self._lock:
            found = self._drives[drive_id].files.get(path)
            return found.content if found else None

    def put_file(self, drive_id: str, path: str, content: bytes) -> None:
        with self._lock:
            self._store(self._drives[drive_id], path, content, "application/octet-stream")

    def paths(self, drive_id: str) -> list[str]:
        with self._lock:
            return sorted(self._drives[drive_id].files)

    def open_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def requests(self) -> list[GraphRequest]:
        with self._lock:
            return list(self._requests)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(dict(scope), receive)
        body = await request.body()
        response = await asyncio.to_thread(self._handle, request, body)
        await response(dict(scope), receive, send)

    def _handle(self, request: Request, body: bytes) -> Response:
        path = request.url.path
        with self._lock:
            self._requests.append(
                GraphRequest(
                    request.method,
                    path,
                    request.url.query,
                    {k.lower(): v for k, v in request.headers.items()},
                    len(body),
                )
            )
            if path.startswith("/login/"):
                return self._token(path, body)
            if self._failures:
                status = self._failures.popleft()
                return graph_error(status, "generalException", "An internal error occurred.")
            if self._throttled:
                status, wait = self._throttled.popleft()
                code = "TooManyRequests" if status == 429 else "serviceNotAvailable"
                return graph_error(
                    status, code, "Please retry after the time given.", **{"Retry-After": str(wait)}
                )
            if path.startswith("/upload/"):
                return self._upload(request, path.removeprefix("/upload/"), body)
            if path.startswith("/download/"):
                return self._download(request, path.removeprefix("/download/"))
            if path.startswith("/v1.0/drives/"):
                refused = self._authenticate(request)
                if refused is not None:
                    return refused
                return self._drive_call(request, path.removeprefix("/v1.0/drives/"), body)
            return graph_error(400, "BadRequest", f"Resource not found for the segment '{path}'.")

    # ------------------------------------------------------------------ identity platform

    def _token(self, path: str, body: bytes) -> Response:
        parts = path.split("/")
        # /login/{tenant}/oauth2/v2.0/token
        if len(parts) != 6 or parts[3:] != ["oauth2", "v2.0", "token"]:
            return identity_error(404, "invalid_request", 90002, "The endpoint is unknown.")
        tenant = parts[2]
        form = dict(parse_qsl(body.decode(errors="replace")))
        if form.get("grant_type") != "client_credentials":
            return identity_error(
                400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
        if not form.get("scope", "").endswith(GRAPH_SCOPE_SUFFIX):
            return identity_error(
                400,
                "invalid_scope",
                1002012,
                "The provided value for scope is not valid. Client credential flows must "
                "have a scope value with /.default suffixed to the resource identifier.",
            )
        if not any(known == tenant for known, _ in self._apps):
            return identity_error(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID.",
            )
        secret = self._apps.get((tenant, form.get("client_id", "")))
        if secret is None:
            return identity_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{form.get('client_id', '')}' was not found in "
                "the directory.",
            )
        if form.get("client_secret") != secret:
            return identity_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request "
                "is the client secret value, not the client secret ID.",
            )
        token = "eyJ0eXAiOiJKV1Qi." + secrets.token_urlsafe(48)
        self._tokens[token] = time.time() + self.token_lifetime
        self.tokens_issued += 1
        return _json(
            {
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
                "ext_expires_in": self.token_lifetime,
                "access_token": token,
            }
        )

    def _authenticate(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
        if not token:
            return graph_error(401, "InvalidAuthenticationToken", "Access token is empty.")
        expires_at = self._tokens.get(token)
        if expires_at is None or expires_at < time.time():
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
            )
        return None

    # ------------------------------------------------------------------ drives and items

    def _drive_call(self, request: Request, rest: str, body: bytes) -> Response:
        drive_id, _, tail = rest.partition("/")
        drive = self._drives.get(drive_id)
        if drive is None:
            return graph_error(404, "itemNotFound", "The requested drive was not found.")
        method = request.method
        if tail == "":
            if method != "GET":
                return graph_error(405, "invalidRequest", "The method is not allowed.")
            return _json(
                {
                    "id": drive.id,
                    "name": drive.name,
                    "driveType": drive.drive_type,
                    "quota": {"total": 1_099_511_627_776, "used": self._used(drive)},
                }
            )
        if tail == "root/children":
            return self._children(request, drive, "")
        if tail == "root":
            return _json(self._folder_item(drive, ""))
        if not tail.startswith("root:/"):
            return graph_error(400, "invalidRequest", f"Unsupported segment {tail!r}.")
        address = tail.removeprefix("root:/")
        action = ""
        for suffix in (":/children", ":/content", ":/createUploadSession"):
            if address.endswith(suffix):
                address, action = address.removesuffix(suffix), suffix[2:]
                break
        item_path = address.removesuffix(":").strip("/")
        if not item_path or any(part in ("", ".", "..") for part in item_path.split("/")):
            return graph_error(400, "invalidRequest", "The path is not valid.")
        if action == "children" and method == "GET":
            return self._children(request, drive, item_path)
        if action == "content" and method == "PUT":
            return self._simple_upload(request, drive, item_path, body)
        if action == "content" and method == "GET":
            found = drive.files.get(item_path)
            if found is None:
                return graph_error(404, "itemNotFound", "The resource could not be found.")
            return Response(
                status_code=302, headers={"Location": self._download_url(drive, item_path)}
            )
        if action == "createUploadSession" and method == "POST":
            return self._create_session(drive, item_path, body)
        if action == "" and method == "GET":
            if item_path in drive.files:
                return _json(self._file_item(drive, item_path))
            if item_path in drive.folders:
                return _json(self._folder_item(drive, item_path))
            return graph_error(404, "itemNotFound", "The resource could not be found.")
        if action == "" and method == "DELETE":
            if item_path in drive.files:
                del drive.files[item_path]
                return Response(status_code=204)
            if item_path in drive.folders:
                drive.folders = {
                    f for f in drive.folders if f != item_path and not f.startswith(item_path + "/")
                }
                for name in [p for p in drive.files if p.startswith(item_path + "/")]:
                    del drive.files[name]
                return Response(status_code=204)
            return graph_error(404, "itemNotFound", "The resource could not be found.")
        return graph_error(405, "invalidRequest", "The method is not allowed for this resource.")

    def _children(self, request: Request, drive: _Drive, folder: str) -> Response:
        if folder and folder not in drive.folders:
            if folder in drive.files:
                return graph_error(400, "invalidRequest", "The item is not a folder.")
            return graph_error(404, "itemNotFound", "The resource could not be found.")
        try:
            top = min(int(request.query_params.get("$top", DEFAULT_PAGE)), MAX_PAGE)
            skip = int(request.query_params.get("$skiptoken", "0"))
        except ValueError:
            return graph_error(400, "invalidRequest", "Invalid $top or $skiptoken.")
        if top < 1:
            return graph_error(400, "invalidRequest", "$top must be positive.")
        prefix = f"{folder}/" if folder else ""
        names: list[tuple[str, bool]] = []
        for candidate in drive.folders:
            if candidate.startswith(prefix) and "/" not in candidate[len(prefix) :]:
                names.append((candidate, True))
        for candidate in drive.files:
            if candidate.startswith(prefix) and "/" not in candidate[len(prefix) :]:
                names.append((candidate, False))
        # Graph lists folders and files by name, not in any order a client may rely on.
        names.sort(key=lambda pair: hashlib.sha1(pair[0].encode()).hexdigest())
        page = names[skip : skip + top]
        value = [
            self._folder_item(drive, name) if is_folder else self._file_item(drive, name)
            for name, is_folder in page
        ]
        answer: dict[str, Any] = {"value": value}
        if skip + top < len(names):
            base = str(request.url).split("?")[0]
            answer["@odata.nextLink"] = f"{base}?$top={top}&$skiptoken={skip + top}"
        return _json(answer)

    def _simple_upload(self, request: Request, drive: _Drive, path: str, body: bytes) -> Response:
        if len(body) > SIMPLE_UPLOAD_MAX_BYTES:
            return graph_error(
                413,
                "requestEntityTooLarge",
                "The request is larger than 4 MB; use an upload session.",
            )
        if path in drive.folders:
            return graph_error(409, "nameAlreadyExists", "A folder with this name exists.")
        existed = path in drive.files
        content_type = request.headers.get("content-type", "application/octet-stream")
        self._store(drive, path, body, content_type)
        return _json(self._file_item(drive, path), 200 if existed else 201)

    def _create_session(self, drive: _Drive, path: str, body: bytes) -> Response:
        try:
            options = json.loads(body) if body else {}
        except ValueError:
            return graph_error(400, "invalidRequest", "The body is not JSON.")
        behaviour = ((options or {}).get("item") or {}).get("@microsoft.graph.conflictBehavior")
        if behaviour == "fail" and path in drive.files:
            return graph_error(409, "nameAlreadyExists", "The specified item name already exists.")
        session_id = secrets.token_urlsafe(24)
        token = secrets.token_urlsafe(32)
        expires = _now() + timedelta(hours=1)
        self._sessions[session_id] = _Session(drive.id, path, token, expires)
        return _json(
            {
                "uploadUrl": f"{self.url}/upload/{session_id}?tempauth={token}",
                "expirationDateTime": _iso(expires),
                "nextExpectedRanges": ["0-"],
            }
        )

    # ------------------------------------------------------------------ upload sessions

    def _upload(self, request: Request, session_id: str, body: bytes) -> Response:
        session = self._sessions.get(session_id)
        if session is None or request.query_params.get("tempauth") != session.token:
            return graph_error(404, "itemNotFound", "The upload session was not found.")
        if request.method == "DELETE":
            del self._sessions[session_id]
            return Response(status_code=204)
        if request.method == "GET":
            return _json(
                {
                    "expirationDateTime": _iso(session.expires_at),
                    "nextExpectedRanges": [f"{len(session.received)}-"],
                }
            )
        if request.method != "PUT":
            return graph_error(405, "invalidRequest", "The method is not allowed.")
        if self._failed_parts:
            status = self._failed_parts.popleft()
            code = "generalException" if status >= 500 else "invalidRequest"
            return graph_error(status, code, "The fragment was not accepted.")
        if "authorization" in request.headers:
            return graph_error(
                401,
                "unauthenticated",
                "The upload URL is pre-authenticated; an Authorization header is refused.",
            )
        parsed = _content_range(request.headers.get("content-range", ""))
        if parsed is None:
            return graph_error(400, "invalidRequest", "A valid Content-Range header is required.")
        start, end, total = parsed
        if end - start + 1 != len(body):
            return graph_error(
                400, "invalidRequest", "The Content-Range does not match the body's length."
            )
        if session.total is None:
            session.total = total
        elif session.total != total:
            return graph_error(400, "invalidRequest", "The declared file size changed.")
        if start != len(session.received):
            return graph_error(
                416,
                "invalidRange",
                "The uploaded fragment overlaps with data that has already been received."
                if start < len(session.received)
                else "The fragment does not start at the next expected range.",
            )
        is_last = end + 1 == total
        if len(body) > MAX_PART_BYTES or (not is_last and len(body) % PART_UNIT_BYTES):
            return graph_error(
                400,
                "invalidRequest",
                "Fragments must be a multiple of 320 KiB, and at most 60 MiB.",
            )
        session.received.extend(body)
        session.expires_at = _now() + timedelta(hours=1)
        interrupted = self._interrupted_parts > 0
        if interrupted:
            self._interrupted_parts -= 1
        if is_last:
            drive = self._drives[session.drive_id]
            existed = session.path in drive.files
            self._store(drive, session.path, bytes(session.received), "application/octet-stream")
            del self._sessions[session_id]
            if interrupted:
                return graph_error(500, "generalException", "The connection was reset.")
            return _json(self._file_item(drive, session.path), 200 if existed else 201)
        if interrupted:
            return graph_error(500, "generalException", "The connection was reset.")
        return _json(
            {
                "expirationDateTime": _iso(session.expires_at),
                "nextExpectedRanges": [f"{len(session.received)}-"],
            },
            202,
        )

    def _download(self, request: Request, download_id: str) -> Response:
        where = self._downloads.get(download_id)
        if where is None or request.query_params.get("tempauth") != where[0]:
            return graph_error(401, "unauthenticated", "The download URL is not valid.")
        _, drive_id, path = where
        found = self._drives[drive_id].files.get(path)
        if found is None:
            return graph_error(404, "itemNotFound", "The resource could not be found.")
        content = found.content
        header = request.headers.get("range")
        if header is None:
            return Response(content, 200, media_type=found.content_type)
        if not header.startswith("bytes=") or "-" not in header:
            return Response(status_code=416)
        first, _, last = header.removeprefix("bytes=").partition("-")
        start = int(first)
        end = min(int(last) if last else len(content) - 1, len(content) - 1)
        if start >= len(content) or start > end:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{len(content)}"})
        return Response(
            content[start : end + 1],
            206,
            media_type=found.content_type,
            headers={"Content-Range": f"bytes {start}-{end}/{len(content)}"},
        )

    # ------------------------------------------------------------------ helpers

    def _store(self, drive: _Drive, path: str, content: bytes, content_type: str) -> None:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            drive.folders.add("/".join(parts[:depth]))
        previous = drive.files.get(path)
        item_id = previous.id if previous else f"01{next(self._ids):010d}"
        drive.files[path] = _File(
            id=item_id,
            content=content,
            etag=f'"{{{uuid.uuid4()}}},1"',
            content_type=content_type,
            modified_at=_now(),
        )

    def _download_url(self, drive: _Drive, path: str) -> str:
        download_id, token = uuid.uuid4().hex, secrets.token_urlsafe(24)
        self._downloads[download_id] = (token, drive.id, path)
        return f"{self.url}/download/{download_id}?UniqueId={download_id}&tempauth={token}"

    def _file_item(self, drive: _Drive, path: str) -> dict[str, Any]:
        found = drive.files[path]
        parent = path.rpartition("/")[0]
        return {
            "id": found.id,
            "name": path.rpartition("/")[2],
            "eTag": found.etag,
            "size": len(found.content),
            "lastModifiedDateTime": _iso(found.modified_at),
            "parentReference": {"driveId": drive.id, "path": f"/drive/root:/{quote(parent)}"},
            "file": {
                "mimeType": found.content_type,
                "hashes": {"sha256Hash": hashlib.sha256(found.content).hexdigest().upper()},
            },
            "@microsoft.graph.downloadUrl": self._download_url(drive, path),
        }

    def _folder_item(self, drive: _Drive, path: str) -> dict[str, Any]:
        children = sum(
            1
            for p in (*drive.files, *drive.folders)
            if p.startswith(f"{path}/" if path else "")
            and "/" not in p[len(path) + 1 if path else 0 :]
        )
        return {
            "id": f"folder-{hashlib.sha1(path.encode()).hexdigest()[:12]}",
            "name": path.rpartition("/")[2] or "root",
            "size": 0,
            "folder": {"childCount": children},
        }

    def _used(self, drive: _Drive) -> int:
        return sum(len(f.content) for f in drive.files.values())


def _content_range(header: str) -> tuple[int, int, int] | None:
    if not header.startswith("bytes "):
        return None
    span, _, total = header.removeprefix("bytes ").partition("/")
    first, _, last = span.partition("-")
    if not (first.isdigit() and last.isdigit() and total.isdigit()):
        return None
    start, end, size = int(first), int(last), int(total)
    if start > end or end >= size:
        return None
    return start, end, size


@asynccontextmanager
async def running_fake_graph() -> AsyncIterator[FakeGraph]:
    """Serve a fresh `FakeGraph` on 127.0.0.1 until the block ends."""
    sock, base_url = bind_local_socket()
    fake = FakeGraph(base_url)
    async with serving_in_thread(
        fake, sock, name="fake-graph", lifespan="off", graceful_shutdown=1
    ):
        yield fake
