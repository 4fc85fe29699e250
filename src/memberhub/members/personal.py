"""A member's personal data in the audit log, sealed with the member's own key, so that
erasing the member erases it there too without touching the chain.

Audit entries are sealed into a tamper-evident chain (`audit/chain.py`): an entry cannot be
changed after it is linked. So the values of a member's personal fields (email, names,
phone, date of birth, custom fields, external ids) are written to its audit entries
encrypted (AES-256-GCM) under a random key kept on the member's row; the names of the
fields that changed stay readable. Reading the log opens them with that key. Erasing the
member deletes the key: the entries still verify, and what they held can no longer be read
(shown as `{"erased": true}`).

Entries written before members had keys keep their values as written.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Fields whose values are personal data: erased on delete, sealed in the audit log.
PERSONAL_FIELDS = (
    "email",
    "first_name",
    "last_name",
    "phone",
    "date_of_birth",
    "custom_fields",
    "external_ids",
)
SEALED = "sealed"
ERASED = {"erased": True}
_PREFIX = "v1."


def new_data_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def _aead(key: str) -> AESGCM:
    return AESGCM(base64.urlsafe_b64decode(key))


def seal_personal(changes: dict[str, Any], key: str, object_id: str) -> dict[str, Any]:
    """`changes` (as `audit.service.diff` gives them) with each personal field's
    before/after sealed; the entry's object id is bound in, so a sealed value cannot be
    moved to another member's entry."""
    aead = _aead(key)
    sealed = dict(changes)
    for field in PERSONAL_FIELDS:
        if field in sealed:
            plain = json.dumps(sealed[field], sort_keys=True, separators=(",", ":"))
            nonce = os.urandom(12)
            token = nonce + aead.encrypt(nonce, plain.encode(), f"{object_id}:{field}".encode())
            sealed[field] = {SEALED: _PREFIX + base64.urlsafe_b64encode(token).decode("ascii")}
    return sealed


def is_sealed(changes: Mapping[str, Any]) -> bool:
    return any(
        isinstance(value, dict) and isinstance(value.get(SEALED), str) for value in changes.values()
    )


def open_personal(changes: dict[str, Any], key: str | None, object_id: str) -> dict[str, Any]:
    """`changes` with sealed values opened; with no key (the member was erased), or a value
    that does not open, each is `{"erased": true}`."""
    if not is_sealed(changes):
        return changes
    aead = _aead(key) if key else None
    opened = dict(changes)
    for field, value in changes.items():
        token = value.get(SEALED) if isinstance(value, dict) else None
        if not isinstance(token, str):
            continue
        opened[field] = dict(ERASED)
        if aead is None or not token.startswith(_PREFIX):
            continue
        try:
            raw = base64.urlsafe_b64decode(token[len(_PREFIX) :])
            plain = aead.decrypt(raw[:12], raw[12:], f"{object_id}:{field}".encode())
        except (ValueError, InvalidTag):
            continue
        opened[field] = json.loads(plain)
    return opened


# The kinds of audit objects whose personal values are sealed with a key of their own:
# members, and leads (which hold the same personal data before they are enrolled).
SEALING_OBJECTS = ("member", "lead")


def ids_with_sealed(entries: Iterable[Any]) -> dict[str, set[str]]:
    """By object type, the ids whose keys are needed to open `entries` (audit entries)."""
    wanted: dict[str, set[str]] = {}
    for entry in entries:
        if entry.object_type in SEALING_OBJECTS and is_sealed(entry.changes):
            wanted.setdefault(entry.object_type, set()).add(entry.object_id)
    return wanted
