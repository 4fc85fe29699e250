"""A directory on this machine as object storage: the embedded installation's default.

Keys are "/"-separated paths under the configured directory. A key is refused unless every
segment is a plain name (no "..", no empty or absolute segment, no backslash or NUL), so no
key reaches outside the directory. A file is written to a temporary name beside its
destination, flushed to disk and renamed over it: a reader sees the old file or the whole
new one, never half of it, and an interrupted upload leaves only a temporary file that
listings skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field, StringConstraints, field_validator

from memberhub.integrations.providers.base import (
    BaseConfig,
    Capability,
    Connection,
    ConnectionFailed,
    Provider,
    StoredObject,
)

MAX_KEY_CHARS = 1024
# Uploads in progress: skipped by listings, never returned as objects.
TEMPORARY_SUFFIX = ".partial"
_COPY_CHUNK = 1024 * 1024

DirectoryPath = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1024)
]


class UnsafeKey(ValueError):
    """A key that would name something outside the storage directory."""


def safe_parts(key: str, *, allow_empty: bool = False) -> list[str]:
    """The key's path segments; UnsafeKey for anything that is not a plain relative path."""
    if len(key) > MAX_KEY_CHARS or "\\" in key or "\x00" in key:
        raise UnsafeKey(f"{key!r} is not a storage key")
    if key == "" and allow_empty:
        return []
    parts = key.split("/")
    if allow_empty and parts[-1] == "":
        parts = parts[:-1]  # a prefix may end with "/"
    for part in parts:
        if part in ("", ".", "..") or part.endswith(TEMPORARY_SUFFIX):
            raise UnsafeKey(f"{key!r} is not a storage key")
    return parts


class LocalStorageConfig(BaseConfig):
    directory: DirectoryPath = Field(
        description="The absolute path of the directory objects are kept in; created when "
        "missing. Keys are paths below it."
    )

    @field_validator("directory")
    @classmethod
    def _absolute(cls, value: str) -> str:
        path = Path(value)
        if not path.is_absolute() or ".." in path.parts:
            raise ValueError("must be an absolute path without '..'")
        return str(path)


def _root(connection: Connection) -> Path:
    config = connection.config
    assert isinstance(config, LocalStorageConfig)
    return Path(config.directory)


def _path(connection: Connection, key: str) -> Path:
    return _root(connection).joinpath(*safe_parts(key))


def _etag(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]


def _write(source: Path, destination: Path) -> StoredObject:
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}")
    try:
        with source.open("rb") as reader, temporary.open("wb") as writer:
            shutil.copyfileobj(reader, writer, _COPY_CHUNK)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(temporary, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    return StoredObject(key="", size=destination.stat().st_size, etag=_etag(destination))


def _list(root: Path, prefix: str) -> list[StoredObject]:
    if not root.is_dir():
        return []
    # Walk only below the prefix's directory part.
    directory_parts = prefix.split("/")[:-1]
    start = root.joinpath(*directory_parts) if directory_parts else root
    if not start.is_dir():
        return []
    found = []
    for path in start.rglob("*"):
        if not path.is_file() or path.name.endswith(TEMPORARY_SUFFIX):
            continue
        key = path.relative_to(root).as_posix()
        if key.startswith(prefix):
            stat = path.stat()
            found.append(StoredObject(key=key, size=stat.st_size, etag=_etag(path)))
    return sorted(found, key=lambda stored: stored.key)


class LocalStorage(Provider):
    name = "local_storage"
    title = "Local directory"
    capabilities: ClassVar = frozenset({Capability.STORAGE})
    config_model = LocalStorageConfig

    async def check_connection(self, connection: Connection) -> str:
        root = _root(connection)

        def probe() -> None:
            root.mkdir(parents=True, exist_ok=True)
            marker = root / f".memberhub-check-{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
            marker.write_bytes(b"ok")
            marker.unlink()

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise ConnectionFailed(f"The directory is not writable: {exc.strerror}") from None
        return f"The directory {root} is writable."

    async def upload_file(
        self, connection: Connection, key: str, path: Path, *, content_type: str
    ) -> StoredObject:
        destination = _path(connection, key)
        stored = await asyncio.to_thread(_write, path, destination)
        return StoredObject(key=key, size=stored.size, etag=stored.etag)

    async def download_file(self, connection: Connection, key: str, path: Path) -> None:
        source = _path(connection, key)
        if not source.is_file():
            raise FileNotFoundError(key)
        await asyncio.to_thread(_write, source, path)

    async def list_objects(self, connection: Connection, prefix: str) -> list[StoredObject]:
        safe_parts(prefix, allow_empty=True)
        return await asyncio.to_thread(_list, _root(connection), prefix)

    async def delete_object(self, connection: Connection, key: str) -> None:
        path = _path(connection, key)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)
