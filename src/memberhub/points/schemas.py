from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from memberhub.kit.types import Input, LongText, UTCDatetime
from memberhub.memberships.schemas import Currency

MAX_POINTS = 10**12
MAX_AMOUNT = 2**53 - 1

Points = Annotated[int, Field(ge=1, le=MAX_POINTS, description="Whole points, at least 1.")]
ReferenceId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$"),
    Field(description="Your id for this operation; a repeat with the same id applies once."),
]
PublicIdRef = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,4}_[0-9a-z]{1,40}$")]
Reason = Annotated[LongText, StringConstraints(min_length=1)]


class _Request(Input):
    member_id: PublicIdRef


class EarnRequest(_Request):
    """Points for a purchase or booking, at the program's earn rate and the member's tier
    multiplier."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": "mem_0a1b2c3d4e",
                    "amount": 4999,
                    "currency": "EUR",
                    "reference_id": "order-10042",
                    "reason": "Online order",
                }
            ]
        }
    )

    amount: int = Field(ge=0, le=MAX_AMOUNT, description="Amount spent, in minor units.")
    currency: Currency
    reference_id: ReferenceId
    reason: Reason | None = None


class AwardRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": "mem_0a1b2c3d4e",
                    "points": 250,
                    "reason": "Volunteered at the annual meeting",
                    "reference_id": "agm-2026-ana",
                    "notify": True,
                }
            ]
        }
    )

    points: Points
    reason: Reason
    reference_id: ReferenceId | None = None
    expires_at: UTCDatetime | None = Field(
        default=None, description="Overrides the program's expiry policy for these points."
    )
    notify: bool = False


class RedeemRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": "mem_0a1b2c3d4e",
                    "points": 100,
                    "reason": "Coffee voucher",
                    "reference_id": "pos-77812",
                }
            ]
        }
    )

    points: Points
    reason: Reason | None = None
    reference_id: ReferenceId | None = None


class DeductRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": "mem_0a1b2c3d4e",
                    "points": 50,
                    "reason": "Correction of a duplicate award",
                    "require_approval": False,
                }
            ]
        }
    )

    points: Points
    reason: Reason
    reference_id: ReferenceId | None = None
    require_approval: bool = False


class ReverseRequest(_Request):
    """Undo an earn (a refund): its unspent points are cancelled, its spent points taken
    back from the balance as the negative-balance policy allows."""

    transaction_id: PublicIdRef | None = Field(default=None, description="The earn to reverse.")
    earn_reference_id: ReferenceId | None = Field(
        default=None, description="Or the reference_id the earn was made with."
    )
    points: Points | None = Field(default=None, description="Part of the earn; default all.")
    reason: Reason | None = None
    reference_id: ReferenceId


class ExtendRequest(Input):
    batch_id: PublicIdRef
    expires_at: UTCDatetime
    reason: Reason


class RecoverRequest(Input):
    """Give back expired points, from one batch or from everything one expiry took."""

    batch_id: PublicIdRef | None = None
    transaction_id: PublicIdRef | None = Field(default=None, description="An expire transaction.")
    points: Points | None = None
    expires_at: UTCDatetime | None = Field(
        default=None, description="New expiry; default the program's policy from now."
    )
    reason: Reason
    reference_id: ReferenceId | None = None


class TransferRequest(Input):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "from_member_id": "mem_0a1b2c3d4e",
                    "to_member_id": "mem_9z8y7x6w5v",
                    "points": 30,
                    "reason": "Gift to a family member",
                }
            ]
        }
    )

    from_member_id: PublicIdRef
    to_member_id: PublicIdRef
    points: Points
    reason: Reason | None = None
    reference_id: ReferenceId | None = None


class AllocationOut(BaseModel):
    batch_id: str
    points: int


class TransactionOut(BaseModel):
    id: str
    member_id: str
    type: str
    points: int = Field(description="Change of the current (spendable) balance.")
    pending_points: int = Field(description="Change of the pending balance.")
    balance_after: int
    pending_after: int
    reason: str | None
    reference_id: str | None
    related_transaction_id: str | None
    batch_id: str | None
    amount: int | None
    currency: str | None
    details: dict[str, Any]
    actor: str
    occurred_at: datetime
    allocations: list[AllocationOut] = Field(
        default_factory=list, description="The batches this transaction drew from."
    )


class BalanceOut(BaseModel):
    current_balance: int
    pending_balance: int
    lifetime_earned: int
    lifetime_redeemed: int
    lifetime_expired: int


class OperationResult(BaseModel):
    transaction: TransactionOut
    balance: BalanceOut
    replayed: bool = Field(description="True when reference_id matched an earlier operation.")


class TransferResult(BaseModel):
    transfer_out: TransactionOut
    transfer_in: TransactionOut
    replayed: bool


class ScheduleItem(BaseModel):
    amount: int
    date: datetime


class TierRef(BaseModel):
    code: str
    name: str


class PointsSummary(BaseModel):
    member_id: str
    current_balance: int
    pending_balance: int
    expiring_balance: int = Field(description="Points expiring within the next 30 days.")
    lifetime_earned: int
    lifetime_redeemed: int
    lifetime_expired: int
    balance_value: int = Field(description="The balance in minor units of `currency`.")
    currency: str
    recent_transactions: list[TransactionOut]
    expiration_schedule: list[ScheduleItem]
    activation_schedule: list[ScheduleItem]
    tier: TierRef | None
    projected_tier: TierRef | None
    next_tier: TierRef | None
    points_to_next_tier: int | None
    last_activity_at: datetime | None


class BalanceAt(BaseModel):
    member_id: str
    as_of: datetime
    current_balance: int
    pending_balance: int


class BatchOut(BaseModel):
    id: str = Field(validation_alias="public_id")
    status: str
    source: str
    initial: int
    remaining: int
    expired_points: int
    recovered_points: int
    reversed_points: int
    activates_at: datetime | None
    expires_at: datetime | None
    created_at: datetime
