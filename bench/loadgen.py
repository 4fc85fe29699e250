"""A lean HTTP/1.1 load client for the benchmarks that measure a server, not a client.

On a small machine the load generator shares the CPU with the server and the database: a
full client library spends about a millisecond of CPU per request (as much as the
database does per write), which the server under test then cannot use. Like `wrk` or
`pgbench`, this client does as little as a correct HTTP/1.1 client can: one keep-alive
connection per concurrent client, a request written as one buffer, the response read by
its `Content-Length`. It speaks only to our own server, which always sends a length.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit


class HttpError(RuntimeError):
    pass


class LeanConnection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        fixed = {"Host": f"{self.host}:{self.port}", **headers}
        self._header_block = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._reader.at_eof():
            await self.close()  # the server closed it while idle (its keep-alive timeout)
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def post_json(self, path: str, body: Any) -> tuple[int, bytes]:
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\n{self._header_block}"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        request = head.encode() + payload
        reused = self._reader is not None
        try:
            return await self._exchange(request)
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            # A kept-alive connection the server closed while idle (its keep-alive timeout,
            # noticed only now if this loop was busy; a reset when the request reached it as
            # it closed): nothing was read from it, so the request is sent once more on a
            # new connection, as HTTP clients do.
            await self.close()
            partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
            if not reused or partial:
                raise
            return await self._exchange(request)

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        reader, writer = await self._open()
        writer.write(request)
        status_line, _, headers = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = None
        close = False
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"connection" and value.strip().lower() == b"close":
                close = True
        if length is None:
            raise HttpError(f"response {status} without Content-Length")
        content = await reader.readexactly(length)
        if close:
            await self.close()
        return status, content

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


class LeanPool:
    """`size` connections, one per concurrent client (client n uses connection n)."""

    def __init__(self, base_url: str, headers: dict[str, str], size: int) -> None:
        self.connections = [LeanConnection(base_url, headers) for _ in range(size)]

    async def post_json(self, client: int, path: str, body: Any) -> tuple[int, bytes]:
        return await self.connections[client].post_json(path, body)

    async def close(self) -> None:
        for connection in self.connections:
            await connection.close()
