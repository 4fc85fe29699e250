"""Re-encrypting every stored secret under a new master secret (`memberhub secrets rotate`).

Every encrypted column is rewritten in one transaction: either all of them move to the new
key or none does. A value that the current key cannot read stops the rotation, naming where
it is, rather than being skipped. The audit chain, sealed with a key derived from the master
secret, is re-sealed under the new one in the same transaction, after every entry checked
under the current one; an entry that does not stops the rotation too (re-sealing it would
hide the tampering).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

import memberhub.models  # noqa: F401 - every table, so foreign keys resolve in a bare CLI process
from memberhub.audit.chain import ChainKey
from memberhub.audit.service import ChainNotResealed, reseal_chain
from memberhub.idempotency.models import IdempotencyRecord
from memberhub.integrations.models import Integration, OAuthAuthorization
from memberhub.kit.crypto import SecretBox, SecretUnreadable
from memberhub.kit.errors import Conflict
from memberhub.webhooks.models import WebhookEndpoint


class RotationFailed(Conflict):
    code = "ROTATION_FAILED"


@dataclass
class RotationReport:
    counts: dict[str, int] = field(default_factory=dict)
    audit_entries_resealed: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# (model, column, binary): every column holding a value the SecretBox wrote.
ENCRYPTED_COLUMNS: tuple[tuple[type[Any], str, bool], ...] = (
    (Integration, "credentials", False),
    (OAuthAuthorization, "code_verifier", False),
    (WebhookEndpoint, "secret", False),
    (WebhookEndpoint, "previous_secret", False),
    (IdempotencyRecord, "response_body", True),
)


async def rotate_secrets(
    session: AsyncSession,
    old: SecretBox,
    new: SecretBox,
    *,
    audit_chain: tuple[ChainKey, ChainKey] | None = None,
) -> RotationReport:
    """`audit_chain`: the chain's (current, new) keys, to re-seal it under the new one."""
    if old.key_id == new.key_id:
        raise RotationFailed("The new master secret is the current one.")
    report = RotationReport()
    for model, column, binary in ENCRYPTED_COLUMNS:
        rows = await session.scalars(select(model).with_for_update())
        moved = 0
        for row in rows:
            value = getattr(row, column)
            if value is None:
                continue
            reencrypt: Callable[[Any], Any] = (
                (lambda v: new.seal(old.open(v)))
                if binary
                else (lambda v: new.encrypt(old.decrypt(v)))
            )
            try:
                setattr(row, column, reencrypt(value))
            except SecretUnreadable as exc:
                raise RotationFailed(
                    f"{model.__tablename__}.{column} of row {row.id} cannot be read with the "
                    "current master secret; nothing was changed.",
                    details={"table": model.__tablename__, "column": column, "row": row.id},
                ) from exc
            moved += 1
        report.counts[f"{model.__tablename__}.{column}"] = moved
    await session.flush()
    if audit_chain is not None:
        current, upcoming = audit_chain
        try:
            resealed = await reseal_chain(session, upcoming, previous_keys=(current,))
        except ChainNotResealed as exc:
            raise RotationFailed(
                f"{exc.message} The secrets were not rotated either.", details=exc.details
            ) from exc
        report.audit_entries_resealed = resealed.resealed
    return report
