from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from memberhub.kit.types import Input, UTCDatetime

AccountCode = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=10, pattern=r"^\S+$")
]
TaxType = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50, pattern=r"^\S+$")
]
Label = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00]+$"),
]
PlanRef = Annotated[str, StringConstraints(min_length=1, max_length=50, pattern=r"^[^\x00\s]+$")]
TenantRef = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z-]{1,64}$")]
IntegrationRef = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$")]


class TrackingChoice(Input):
    category: Label = Field(description="A tracking category's name, e.g. Region.")
    option: Label = Field(description="One of its options, e.g. North.")


class RevenueAccount(Input):
    account_code: AccountCode = Field(description="The revenue account the plan's sales go to.")
    tax_type: TaxType | None = Field(
        default=None, description="Xero's tax type (OUTPUT2, NONE…); default: the account's."
    )
    tracking: list[TrackingChoice] = Field(default_factory=list, max_length=2)


class MappingIn(Input):
    """How an accounting integration books memberships' money. Every account code, tax type
    and tracking option is checked against the organisation's chart when saved."""

    tenant_id: TenantRef | None = Field(
        default=None,
        description="The organisation (from GET /connections) to book into; needed when the "
        "connection reaches more than one.",
    )
    payments_integration_id: IntegrationRef | None = Field(
        default=None,
        description="The payments integration (Stripe) whose money is booked; default: any.",
    )
    plans: dict[PlanRef, RevenueAccount] = Field(
        default_factory=dict,
        max_length=500,
        description="Plan id or code → where its revenue goes.",
    )
    default_revenue: RevenueAccount | None = Field(
        default=None, description="For plans not listed in `plans`."
    )
    payments_account_code: AccountCode = Field(
        description="Where Stripe's takings are recorded as received: a bank account (a "
        "Stripe clearing account) or an account enabled for payments."
    )
    payouts_bank_account_code: AccountCode | None = Field(
        default=None, description="The bank account Stripe's payouts land in."
    )
    fees_account_code: AccountCode | None = Field(
        default=None, description="The expense account for Stripe's fees."
    )

    @model_validator(mode="after")
    def _some_revenue(self) -> MappingIn:
        if not self.plans and self.default_revenue is None:
            raise ValueError("set `plans` or `default_revenue`: where sales go")
        return self


class MappingOut(BaseModel):
    integration_id: str
    tenant_id: str
    tenant_name: str | None
    mapping: dict[str, Any]
    validated_at: datetime


class EntryLog(BaseModel):
    at: str
    step: str
    outcome: str
    message: str | None = None
    id: str | None = None


class FinanceEntryOut(BaseModel):
    id: str
    integration_id: str
    kind: Literal["sale", "unpaid", "refund", "payout"]
    source_ref: str
    member_id: str | None
    amount: int
    currency: str
    occurred_at: datetime
    status: Literal["pending", "done", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    contact_id: str | None
    invoice_id: str | None
    payment_id: str | None
    credit_note_id: str | None
    refund_id: str | None
    transfer_id: str | None
    fees_id: str | None
    log: list[EntryLog]
    created_at: datetime
    completed_at: datetime | None


class ReconciliationCreate(Input):
    integration_id: IntegrationRef = Field(description="The accounting integration (Xero).")
    payments_integration_id: IntegrationRef | None = Field(
        default=None,
        description="The payments integration (Stripe); default: the mapping's, or the only one.",
    )
    period_start: UTCDatetime
    period_end: UTCDatetime

    @model_validator(mode="after")
    def _period(self) -> ReconciliationCreate:
        if self.period_end <= self.period_start:
            raise ValueError("period_end must be after period_start")
        if (self.period_end - self.period_start).days > 366:
            raise ValueError("a reconciliation covers at most a year")
        return self


class Mismatch(BaseModel):
    id: str
    kind: Literal[
        "paid_in_stripe_no_invoice",
        "invoice_without_payment",
        "amount_or_currency_differs",
        "membership_active_without_payment",
        "payment_without_membership_change",
        "refund_without_credit_note",
        "credit_note_without_refund",
        "refund_amount_differs",
        "credit_note_not_refunded",
        "payout_not_in_xero",
        "payout_amount_differs",
    ]
    description: str
    member_id: str | None = None
    stripe_id: str | None = Field(default=None, description="The Stripe charge, refund or payout.")
    invoice_id: str | None = None
    credit_note_id: str | None = None
    transfer_id: str | None = Field(default=None, description="Xero's bank transfer.")
    term_id: str | None = None
    stripe_amount: int | None = None
    stripe_currency: str | None = None
    xero_amount: int | None = None
    xero_currency: str | None = None
    balance_amount: int | None = Field(
        default=None,
        description="For a payout: what the balance transactions it paid out come to "
        "(charges less refunds and fees).",
    )
    fix: (
        Literal[
            "create_missing_invoice",
            "link_payment",
            "create_missing_credit_note",
            "link_refund",
            "book_payout",
        ]
        | None
    ) = None
    fix_description: str
    fixed_at: str | None = None
    entry_id: str | None = Field(
        default=None, description="The finance entry the applied fix queued."
    )


class ReconciliationSummary(BaseModel):
    stripe_charges: int = 0
    stripe_refunds: int = 0
    stripe_payouts: int = 0
    xero_invoices: int = 0
    xero_credit_notes: int = 0
    xero_bank_transfers: int = 0
    membership_terms: int = 0
    matched: int = Field(default=0, description="Stripe charges that matched in full.")
    refunds_matched: int = 0
    payouts_matched: int = 0
    mismatches: int = 0


class ReconciliationOut(BaseModel):
    id: str
    integration_id: str
    payments_integration_id: str
    period_start: datetime
    period_end: datetime
    status: Literal["queued", "running", "completed", "failed"]
    error: str | None
    summary: ReconciliationSummary | None
    mismatches: list[Mismatch]
    created_at: datetime
    completed_at: datetime | None


class FixOut(BaseModel):
    mismatch: Mismatch
    entry_id: str | None = Field(description="The finance entry that books the fix.")
