"""Amounts are whole numbers of a currency's smallest unit, counted as Stripe counts them.

Plan prices, earn amounts and payments are all stored that way: cents for EUR or MYR, yen
for JPY, thousandths for KWD. Converting an amount to another currency therefore needs
both currencies' number of decimals, besides the rate between their whole units.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

# Stripe's lists (docs.stripe.com/currencies); every other currency has two decimals. ISK,
# HUF and TWD are charged in whole units but still counted with two decimals.
ZERO_DECIMAL_CURRENCIES = frozenset(
    {
        "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA",
        "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF",
    }
)  # fmt: skip
THREE_DECIMAL_CURRENCIES = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})


def minor_unit_digits(currency: str) -> int:
    """How many decimals the smallest unit of `currency` (an ISO 4217 code) stands for."""
    code = currency.upper()
    if code in ZERO_DECIMAL_CURRENCIES:
        return 0
    if code in THREE_DECIMAL_CURRENCIES:
        return 3
    return 2


def convert(amount: int, *, source: str, target: str, rate: float | Decimal) -> int:
    """`amount` in `source` as an amount in `target`, where one whole unit of `source` is
    worth `rate` whole units of `target`; rounded to the nearest smallest unit (half up)."""
    shift = minor_unit_digits(target) - minor_unit_digits(source)
    # The rate as written (1.08, not its binary approximation).
    exact = Decimal(amount) * Decimal(str(rate)).scaleb(shift)
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))
