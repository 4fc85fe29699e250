"""Stripe's payouts against Stripe's own balance and Xero's bank transfers.

A paid payout must come to what it paid out: the nets of its balance transactions
(charges less refunds less fees); when it does not, `payout_amount_differs` names the
difference Stripe shows. The payout flow (`booking.py`) books a paid payout as a bank
transfer, referenced by the payout's id, from the clearing account to the mapping's
`payouts_bank_account_code`: no such transfer is `payout_not_in_xero` (fix:
`book_payout`, queued through the payout flow), one of another amount is
`payout_amount_differs`. With no payouts bank in the mapping, payouts are not booked, so
only Stripe's own sums are checked.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

from memberhub.finance.report import MismatchList, money
from memberhub.integrations.providers.base import LedgerTransfer, MoneyRecord
from memberhub.kit.money import minor_unit_digits


def minor_units(amount: Decimal, currency: str) -> int:
    return int(amount.scaleb(minor_unit_digits(currency)).to_integral_value())


def match_payouts(
    payouts: list[MoneyRecord],
    nets: dict[str, int],
    transfers: list[LedgerTransfer],
    bank: str | None,
    mismatches: MismatchList,
) -> int:
    """Add the payouts' mismatches; return how many paid payouts matched."""
    by_reference: dict[str, list[LedgerTransfer]] = defaultdict(list)
    for transfer in transfers:
        if transfer.reference:
            by_reference[transfer.reference].append(transfer)
    matched = 0
    for payout in sorted(payouts, key=lambda p: (p.created_at, p.id)):
        if payout.status != "paid":
            continue
        fine = True
        fields = {
            "stripe_id": payout.id,
            "stripe_amount": payout.amount,
            "stripe_currency": payout.currency,
        }
        net = nets.get(payout.id)
        if net is not None and net != payout.amount:
            fine = False
            mismatches.add(
                "payout_amount_differs",
                f"Stripe payout {payout.id} is {money(payout.amount, payout.currency)} but the "
                f"balance transactions it paid out (charges less refunds and fees) come to "
                f"{money(net, payout.currency)}.",
                None,
                "Look at the payout's balance transactions in Stripe's Dashboard.",
                balance_amount=net,
                **fields,
            )
        if bank:
            found = by_reference.get(payout.id, [])
            into_bank = [t for t in found if t.to_account == bank]
            if not into_bank:
                fine = False
                elsewhere = found[0] if found else None
                mismatches.add(
                    "payout_not_in_xero",
                    f"Stripe payout {payout.id} ({money(payout.amount, payout.currency)}) "
                    + (
                        f"went to account {elsewhere.to_account} in Xero, not the payouts bank "
                        f"account {bank}."
                        if elsewhere
                        else f"has no transfer into bank account {bank} in Xero."
                    ),
                    None if elsewhere else "book_payout",
                    "Correct the transfer's account in Xero."
                    if elsewhere
                    else "Book the payout's transfer (and Stripe's fees) in Xero.",
                    transfer_id=elsewhere.id if elsewhere else None,
                    _fix={
                        "payout_id": payout.id,
                        "amount": payout.amount,
                        "currency": payout.currency,
                        "occurred_at": (payout.arrives_at or payout.created_at).isoformat(),
                    },
                    **fields,
                )
            else:
                transfer = into_bank[0]
                booked = minor_units(transfer.amount, payout.currency)
                if booked != payout.amount:
                    fine = False
                    mismatches.add(
                        "payout_amount_differs",
                        f"Stripe payout {payout.id} is {money(payout.amount, payout.currency)}; "
                        f"its transfer in Xero is {money(booked, payout.currency)}.",
                        None,
                        "Correct the transfer's amount in Xero.",
                        transfer_id=transfer.id,
                        xero_amount=booked,
                        xero_currency=payout.currency,
                        **fields,
                    )
        matched += fine
    return matched
