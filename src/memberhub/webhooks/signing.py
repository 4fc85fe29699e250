"""Standard Webhooks secrets, signatures and event-type patterns."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache

from standardwebhooks import Webhook

from memberhub.events.catalog import CATALOG
from memberhub.kit.errors import ValidationFailed

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


@lru_cache(maxsize=4096)
def _signer(secret: str) -> Webhook:
    return Webhook(secret)


def signature_header(secrets_: Sequence[str], msg_id: str, timestamp: datetime, body: str) -> str:
    """`webhook-signature`: one `v1,…` signature per valid secret, separated by spaces."""
    return " ".join(_signer(secret).sign(msg_id, timestamp, body) for secret in secrets_)


def unknown_patterns(patterns: Iterable[str]) -> list[str]:
    """Patterns matching no event type of the catalog."""
    return [p for p in patterns if not any(matches(p, name) for name in CATALOG)]


def checked_event_types(patterns: Sequence[str]) -> list[str]:
    """The patterns of a webhook endpoint or an event sink, sorted and without repeats; one
    matching no event of the catalog (a misspelt name would never match anything) is
    refused."""
    unknown = unknown_patterns(patterns)
    if unknown:
        raise ValidationFailed(
            f"These event types match no event of the catalog: {', '.join(unknown[:10])} "
            "(see /api/v1/event-types).",
            details={"field": "event_types", "unknown": unknown[:20]},
        )
    return sorted(set(patterns))


def matches(pattern: str, event_type: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


class TypeMatcher:
    """Matches event types against an endpoint's patterns, remembering each answer."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._seen: dict[str, bool] = {}

    def __call__(self, event_type: str) -> bool:
        answer = self._seen.get(event_type)
        if answer is None:
            answer = any(matches(p, event_type) for p in self.patterns)
            self._seen[event_type] = answer
        return answer
