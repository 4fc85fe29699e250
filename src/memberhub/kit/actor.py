"""Who is acting, carried from the boundary into services for audit and events."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    """The caller of a write: an API key, a CLI user or the scheduler."""

    id: str
    request_id: str | None = None
    client_ip: str | None = None

    @classmethod
    def system(cls, name: str = "system") -> Actor:
        return cls(id=name)
