"""The event catalog: every event type, its version and the schema of its `data`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from memberhub.activities.schemas import ActivityOut
from memberhub.leads.schemas import LeadOut
from memberhub.members.schemas import MemberOut


class EventData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: ClassVar[str]
    version: ClassVar[int] = 1
    description: ClassVar[str]


class MemberCreated(EventData):
    event_type = "member.created"
    description = "A member was created."

    member: MemberOut


class MemberUpdated(EventData):
    event_type = "member.updated"
    description = "A member's profile, consent, custom fields or external ids changed."

    member: MemberOut
    changed_fields: list[str]


class MemberDeleted(EventData):
    event_type = "member.deleted"
    description = "A member's personal data was erased; ledger and audit rows are kept."

    member_id: str
    organisation_id: str | None
    deleted_at: datetime


class MemberConsentChanged(EventData):
    event_type = "member.consent_changed"
    description = (
        "A member granted or withdrew consent for one purpose (email, sms, analytics, "
        "profiling, crm, marketing_email); `source` says where the change came from (api, "
        "console, import, crm, vendor_webhook, erasure)."
    )

    member_id: str
    organisation_id: str | None
    purpose: str
    granted: bool
    source: str
    occurred_at: datetime


class MemberStatusChanged(EventData):
    event_type = "member.status.changed"
    description = (
        "A member's membership status changed (join, renew, lapse, cancel, suspend, "
        "reinstate, upgrade, grace)."
    )

    member_id: str
    organisation_id: str | None
    from_status: str
    to_status: str
    reason: str
    plan_id: str | None
    term_ends_at: datetime | None
    grace_ends_at: datetime | None
    occurred_at: datetime


class MembershipRenewalDue(EventData):
    event_type = "membership.renewal_due"
    description = (
        "A member's term ends soon: once per term end and notice period of the "
        "notification settings (`renewal_due_days`)."
    )

    member_id: str
    organisation_id: str | None
    plan_id: str | None
    term_ends_at: datetime
    days_left: int
    occurred_at: datetime


class PointsChange(EventData):
    """The shape shared by points events: one ledger transaction of one member."""

    member_id: str
    transaction_id: str
    transaction_type: str
    points: int
    pending_points: int
    balance_after: int
    pending_after: int
    reason: str | None
    reference_id: str | None
    occurred_at: datetime


class PointsEarned(PointsChange):
    event_type = "points.earned"
    description = (
        "Points were credited: earned from a purchase, awarded, transferred in, or became "
        "active after their pending period. `notify` asks notifiers to tell the member."
    )

    amount: int | None = None
    currency: str | None = None
    expires_at: datetime | None = None
    activates_at: datetime | None = None
    notify: bool = False


class PointsRedeemed(PointsChange):
    event_type = "points.redeemed"
    description = "Points were redeemed (directly or by a reward claim)."


class PointsDeducted(PointsChange):
    event_type = "points.deducted"
    description = "Points were deducted by staff or transferred out to another member."


class PointsAdjusted(PointsChange):
    event_type = "points.adjusted"
    description = (
        "A correction: an earn reversed (refund), expiry extended, expired points recovered, "
        "or a redemption refunded."
    )


class PointsExpired(EventData):
    event_type = "points.expired"
    description = "Points expired; one event per member and expiry run."

    member_id: str
    transaction_id: str
    points: int
    balance_after: int
    batches: int
    occurred_at: datetime


class PointsExpiring(EventData):
    event_type = "points.expiring"
    description = "A batch of points will expire soon; sent once per batch."

    member_id: str
    batch_id: str
    points: int
    expires_at: datetime
    days_left: int


class MemberTierChanged(EventData):
    event_type = "member.tier.changed"
    description = "A member's tier changed (earned, reviewed, or assigned by staff)."

    member_id: str
    previous_tier: str | None
    new_tier: str | None
    reason: str
    occurred_at: datetime


class ActivityRecorded(EventData):
    event_type = "activity.recorded"
    description = (
        "An activity was recorded (over the API or from a connector): `member_id` is null "
        "while it matches no member; `credits` are what the earning rules did for it."
    )

    activity: ActivityOut


class ActivityMatched(EventData):
    event_type = "activity.matched"
    description = (
        "An unmatched activity found its member (one created with its email or external "
        "id, or named by staff) and the earning rules were evaluated for it."
    )

    activity: ActivityOut


class RewardCreated(EventData):
    event_type = "reward.created"
    description = "A reward was added to the catalog."

    reward_id: str
    code: str
    name: str
    points_cost: int
    active: bool


class RewardUpdated(EventData):
    event_type = "reward.updated"
    description = (
        "A reward in the catalog changed; `changed` names the fields. A reward set inactive "
        "is retired: it can no longer be claimed."
    )

    reward_id: str
    code: str
    name: str
    points_cost: int
    active: bool
    changed: list[str]


class RewardClaimed(EventData):
    event_type = "reward.claimed"
    description = "A member claimed a reward; stock and points were taken together."

    member_id: str
    reward_id: str
    reward_code: str
    claim_id: str
    points: int
    transaction_id: str
    occurred_at: datetime


class RewardClaimCancelled(EventData):
    event_type = "reward.claim.cancelled"
    description = "A reward claim was cancelled; its points and stock were given back."

    member_id: str
    reward_id: str
    claim_id: str
    points: int
    transaction_id: str
    occurred_at: datetime


class ApprovalRequested(EventData):
    event_type = "approval.requested"
    description = "A points operation awaits a manager's approval."

    approval_id: str
    operation: str
    member_id: str
    points: int
    reason: str
    requested_by: str
    occurred_at: datetime


class ApprovalDecided(EventData):
    event_type = "approval.decided"
    description = (
        "A held points operation was approved (and applied: `transaction_id`) or rejected."
    )

    approval_id: str
    operation: str
    member_id: str
    points: int
    decision: Literal["approved", "rejected"]
    decided_by: str
    note: str | None
    transaction_id: str | None
    occurred_at: datetime


class AlertRaised(EventData):
    event_type = "alert.raised"
    description = "An alert was raised (points expiring, large redemption, negative balance, "
    "high expiration rate, low redemption rate)."

    alert_id: str
    alert_type: str
    priority: str
    member_id: str | None
    message: str
    data: dict[str, Any]
    occurred_at: datetime


class MemberPaymentChanged(EventData):
    event_type = "member.payment.changed"
    description = "A payments integration reported a payment of the member: paid, failed "
    "(past_due), refunded or its subscription cancelled."

    member_id: str
    organisation_id: str | None
    integration_id: str
    payment_status: str
    references: list[str]
    amount: int | None
    currency: str | None
    occurred_at: datetime


class LeadCreated(EventData):
    event_type = "lead.created"
    description = "A lead was created (through the API or an import)."

    lead: LeadOut


class LeadUpdated(EventData):
    event_type = "lead.updated"
    description = "A lead's details or pipeline status changed."

    lead: LeadOut
    changed_fields: list[str]


class EnrollmentCompleted(EventData):
    event_type = "enrollment.completed"
    description = "A lead was enrolled: it became a member (joining a plan when one was given)."

    lead_id: str
    member_id: str
    organisation_id: str | None
    plan_id: str | None
    occurred_at: datetime


class WebhookEndpointDisabled(EventData):
    event_type = "webhook.endpoint.disabled"
    description = "A webhook endpoint was disabled: it answered 410 Gone, or failed without a "
    "single success for longer than the configured period."

    endpoint_id: str
    url: str = Field(
        description="The endpoint's URL without its path and query (shown as `/…`): they "
        "often carry a token, and the event goes to every endpoint subscribed to it."
    )
    reason: str
    disabled_at: datetime


class IntegrationIncidentOpened(EventData):
    event_type = "integration.incident.opened"
    description = "An integration stopped working: a call failed for good, its circuit "
    "breaker opened, or the vendor refused the credentials."

    integration_id: str
    provider: str
    name: str
    reason: str
    opened_at: datetime


class IntegrationIncidentClosed(EventData):
    event_type = "integration.incident.closed"
    description = "An integration works again: a call succeeded after an incident."

    integration_id: str
    provider: str
    name: str
    opened_at: datetime
    closed_at: datetime


class ExportCompleted(EventData):
    event_type = "export.completed"
    description = (
        "An export run finished: its files and manifest are in the storage target. A run "
        "with nothing new carries no files and an empty manifest."
    )

    export_id: str
    run_id: str
    sequence: int
    table: str
    format: str
    mode: str
    storage_integration_id: str
    rows: int
    bytes: int
    files: int
    manifest_key: str
    watermark_from: int | None
    watermark_to: int | None
    finished_at: datetime


class WebhookTest(EventData):
    event_type = "webhook.test"
    description = "A test event, sent to the one endpoint it was requested for."

    endpoint_id: str
    message: str


CATALOG: dict[str, type[EventData]] = {
    model.event_type: model
    for model in (
        MemberCreated,
        MemberUpdated,
        MemberDeleted,
        MemberConsentChanged,
        MemberStatusChanged,
        MembershipRenewalDue,
        MemberTierChanged,
        MemberPaymentChanged,
        LeadCreated,
        LeadUpdated,
        EnrollmentCompleted,
        PointsEarned,
        PointsRedeemed,
        PointsDeducted,
        PointsAdjusted,
        PointsExpired,
        PointsExpiring,
        ActivityRecorded,
        ActivityMatched,
        RewardCreated,
        RewardUpdated,
        RewardClaimed,
        RewardClaimCancelled,
        ApprovalRequested,
        ApprovalDecided,
        AlertRaised,
        WebhookEndpointDisabled,
        IntegrationIncidentOpened,
        IntegrationIncidentClosed,
        ExportCompleted,
        WebhookTest,
    )
}


def schema_for(model: type[EventData]) -> dict[str, Any]:
    return model.model_json_schema(mode="serialization")
