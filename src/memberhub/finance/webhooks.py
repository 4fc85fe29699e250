"""What the accounting system's webhooks tell us: an invoice or contact changed there (a
bookkeeper voided an invoice, removed a payment, merged a contact). The change is written
to the log of every finance entry that booked that invoice or contact, so the entry's
history shows what happened to it after it was booked; the next reconciliation shows
whether the books still agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.finance.models import FinanceEntry
from memberhub.integrations.models import Integration

MAX_ENTRIES_PER_EVENT = 100


async def apply_accounting_events(
    session: AsyncSession, integration: Integration, payload: Any, now: datetime
) -> dict[str, Any]:
    events = payload.get("events") if isinstance(payload, Mapping) else None
    if not isinstance(events, list):
        return {"events": 0, "entries": []}
    touched: list[str] = []
    for event in events:
        if not isinstance(event, Mapping):
            continue
        resource = event.get("resourceId")
        category = str(event.get("eventCategory") or "")
        if not isinstance(resource, str) or category not in ("INVOICE", "CONTACT"):
            continue
        column = FinanceEntry.invoice_id if category == "INVOICE" else FinanceEntry.contact_id
        condition = (
            or_(column == resource, FinanceEntry.credit_note_id == resource)
            if category == "INVOICE"
            else column == resource
        )
        rows = await session.scalars(
            select(FinanceEntry)
            .where(FinanceEntry.integration_id == integration.id, condition)
            .limit(MAX_ENTRIES_PER_EVENT)
        )
        for entry in rows:
            entry.log = [
                *entry.log,
                {
                    "at": now.isoformat(),
                    "step": "xero_webhook",
                    "outcome": f"{category}.{event.get('eventType', '?')}"[:100],
                    "id": resource[:64],
                },
            ]
            entry.updated_at = now
            touched.append(entry.public_id)
    return {"events": len(events), "entries": touched}
