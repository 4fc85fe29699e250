"""The credential vault: an integration's credentials as one encrypted JSON object.

Only `seal` and `unseal` see plaintext; what the API shows comes from `hints`, which keeps
the last four characters of each secret and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from memberhub.kit.crypto import SecretBox

VISIBLE_TAIL = 4
# Not secrets: shown as they are.
PLAIN_FIELDS = frozenset({"expires_at", "token_type", "scope"})


def seal(box: SecretBox, credentials: Mapping[str, Any]) -> str:
    return box.encrypt(json.dumps(dict(credentials), separators=(",", ":"), sort_keys=True))


def unseal(box: SecretBox, stored: str) -> dict[str, Any]:
    """The credentials; raises SecretUnreadable when written under another master secret."""
    value = json.loads(box.decrypt(stored))
    assert isinstance(value, dict)
    return value


def hint(secret: str) -> str:
    """`…abcd`: the last four characters, or none of a secret too short to spare them."""
    return f"…{secret[-VISIBLE_TAIL:]}" if len(secret) > 2 * VISIBLE_TAIL else "…"


def hints(credentials: Mapping[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for name, value in credentials.items():
        if value is None:
            continue
        shown[name] = value if name in PLAIN_FIELDS else hint(str(value))
    return shown
