"""Stripe's refunds against Xero's credit notes.

The refund flow (`booking.py`) books each refund as a credit note against the refunded
payment's invoice, then refunds the credit note: its reference is the refund entry's
source — `<charge>:refunded:<refunded so far>` when a `charge.refunded` notice queued it,
the refund's own id when a reconciliation's fix did. So a refund's credit notes are those
whose reference is the refund's id or names one of the refund's payment ids.

Refunds are paired with credit notes of the same amount and currency first, then a credit
note with the run of the payment's refunds (in order) it adds up to (a lost or late notice
books the refunds so far at once), then with whatever credit note of the same payment is
left (`refund_amount_differs`); a refund left
alone is `refund_without_credit_note` (fix: `create_missing_credit_note`, queued through
the refund flow), a credit note whose money was not paid back in Xero is
`credit_note_not_refunded` (fix: `link_refund`), and a credit note of the period no refund
claimed is `credit_note_without_refund`.
"""

from __future__ import annotations

import re
from datetime import datetime, tzinfo

from memberhub.finance.report import MismatchList, issued_in, money, record_of
from memberhub.integrations.providers.base import LedgerDocument, MoneyRecord

REFUNDED_REFERENCE = re.compile(r"^(?P<payment>.+):refunded:\d+$")
# A refund that moved money or is moving it; failed and canceled ones moved none.
LIVE_REFUND = frozenset({"succeeded", "pending", "requires_action"})
DEAD_DOCUMENT = frozenset({"VOIDED", "DELETED"})


def _payment_of(note: LedgerDocument) -> str:
    reference = note.reference or ""
    found = REFUNDED_REFERENCE.match(reference)
    return found.group("payment") if found else reference


def match_refunds(
    refunds: list[MoneyRecord],
    documents: list[LedgerDocument],
    records: dict[str, tuple[str, int]],
    public_of: dict[int, str],
    mismatches: MismatchList,
    start: datetime,
    end: datetime,
    zone: tzinfo,
) -> int:
    """Add the refunds' mismatches; return how many refunds matched. Credit notes are
    dated on the program's calendar (`zone`)."""
    notes = [d for d in documents if d.kind == "credit_note" and d.status not in DEAD_DOCUMENT]
    ordered = sorted(
        (r for r in refunds if r.status in LIVE_REFUND), key=lambda r: (r.created_at, r.id)
    )
    claimed: set[str] = set()
    paired: dict[str, LedgerDocument] = {}
    # Each refund's credit notes, found once: those naming the refund, then those naming one
    # of its payment's ids (each in the order of `notes`).
    position = {note.id: index for index, note in enumerate(notes)}
    by_reference: dict[str, list[LedgerDocument]] = {}
    by_payment: dict[str, list[LedgerDocument]] = {}
    for document in notes:
        by_reference.setdefault(document.reference or "", []).append(document)
        by_payment.setdefault(_payment_of(document), []).append(document)
    candidates: dict[str, list[LedgerDocument]] = {}
    refunds_of: dict[str, list[MoneyRecord]] = {}
    for refund in ordered:
        direct = by_reference.get(refund.id, [])
        via_payment = {
            document.id: document
            for key in {refund.id, *refund.references}
            for document in by_payment.get(key, [])
            if document.reference != refund.id
        }
        found = [*direct, *sorted(via_payment.values(), key=lambda n: position[n.id])]
        candidates[refund.id] = found
        for document in found:
            refunds_of.setdefault(document.id, []).append(refund)

    def unclaimed(refund: MoneyRecord) -> list[LedgerDocument]:
        return [n for n in candidates[refund.id] if n.id not in claimed]

    def pair(refund: MoneyRecord, note: LedgerDocument) -> None:
        paired[refund.id] = note
        claimed.add(note.id)

    for refund in ordered:
        same = [
            n
            for n in unclaimed(refund)
            if n.total == refund.amount and n.currency == refund.currency
        ]
        if same:
            pair(refund, same[0])
    # A notice lost or overtaken books what was refunded so far in one credit note: it
    # answers for the payment's refunds not yet paired, in order, that add up to it.
    for booked in notes:
        if booked.id in claimed:
            continue
        run: list[MoneyRecord] = []
        for refund in refunds_of.get(booked.id, []):
            if refund.id in paired:
                continue
            if refund.currency != booked.currency:
                break
            run.append(refund)
            if sum(r.amount for r in run) >= booked.total:
                break
        if len(run) > 1 and sum(r.amount for r in run) == booked.total:
            for refund in run:
                paired[refund.id] = booked
            claimed.add(booked.id)
    for refund in ordered:
        if refund.id not in paired and (left := unclaimed(refund)):
            pair(refund, left[0])
    # What each credit note answers for: the refunds paired with it.
    covers: dict[str, int] = {}
    for refund in ordered:
        if refund.id in paired:
            note_id = paired[refund.id].id
            covers[note_id] = covers.get(note_id, 0) + refund.amount

    matched = 0
    for refund in ordered:
        record = record_of(refund, records)
        member_public = public_of.get(record[1]) if record else refund.member_id
        fields = {
            "member_id": member_public,
            "stripe_id": refund.id,
            "stripe_amount": refund.amount,
            "stripe_currency": refund.currency,
        }
        plan = {
            "refund_id": refund.id,
            "payment_key": record[0] if record else None,
            "amount": refund.amount,
            "currency": refund.currency,
            "occurred_at": refund.created_at.isoformat(),
        }
        note = paired.get(refund.id)
        if note is None:
            mismatches.add(
                "refund_without_credit_note",
                f"Stripe refund {refund.id} ({money(refund.amount, refund.currency)}) has no "
                "credit note in Xero.",
                "create_missing_credit_note" if record else None,
                "Create the credit note and its refund in Xero."
                if record
                else "Find the payment this refund is for, then book it by hand.",
                _fix=plan,
                **fields,
            )
            continue
        note_fields = {
            "credit_note_id": note.id,
            "xero_amount": note.total,
            "xero_currency": note.currency,
        }
        if note.total != covers[note.id] or note.currency != refund.currency:
            mismatches.add(
                "refund_amount_differs",
                f"Stripe refund {refund.id} is {money(refund.amount, refund.currency)}; Xero "
                f"credit note {note.number or note.id} is {money(note.total, note.currency)}.",
                None,
                "Correct the credit note in Xero to the refund's amount.",
                **note_fields,
                **fields,
            )
        elif note.amount_due > 0 and note.status != "PAID":
            mismatches.add(
                "credit_note_not_refunded",
                f"Xero credit note {note.number or note.id} is not refunded though Stripe "
                f"refund {refund.id} paid the money back.",
                "link_refund",
                "Record the Stripe refund against the credit note in Xero.",
                _fix={**plan, "credit_note_id": note.id},
                **note_fields,
                **fields,
            )
        else:
            matched += 1
    for note in notes:
        if note.id in claimed or note.issued_on is None:
            continue
        if not issued_in(note.issued_on, start, end, zone):
            continue
        mismatches.add(
            "credit_note_without_refund",
            f"Xero credit note {note.number or note.id} "
            f"({money(note.total, note.currency)}, reference {note.reference or '-'}) "
            "matches no Stripe refund in the period.",
            None,
            "Refund the payment in Stripe, or void the credit note in Xero.",
            credit_note_id=note.id,
            xero_amount=note.total,
            xero_currency=note.currency,
        )
    return matched
