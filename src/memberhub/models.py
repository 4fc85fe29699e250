"""Imports every model so that the metadata (and Alembic) sees all tables."""

from memberhub.activities.models import Activity
from memberhub.alerts.models import Alert
from memberhub.approvals.models import ApprovalRequest
from memberhub.audit.models import AuditEntry
from memberhub.auth.models import ApiKey
from memberhub.bulk.models import BulkJob, BulkJobChunk, BulkJobRow
from memberhub.crm.models import CrmConflict, CrmLink, CrmSyncState, SyncRun, SyncRunRecord
from memberhub.earning_rules.models import EarningRule, EarningRuleVersion, RuleAward
from memberhub.events.models import Event
from memberhub.exports.models import Export, ExportPart, ExportRun
from memberhub.finance.models import AccountingMapping, FinanceEntry, Reconciliation
from memberhub.idempotency.models import IdempotencyRecord
from memberhub.integrations.models import (
    InboundEvent,
    Integration,
    IntegrationCall,
    IntegrationIncident,
    OAuthAuthorization,
    PaymentRecord,
)
from memberhub.kit.db import Base
from memberhub.leads.models import Lead
from memberhub.marketing.models import (
    JourneyFiring,
    MarketingContact,
    MarketingSegment,
    MarketingSyncState,
)
from memberhub.members.models import ConsentChange, Member
from memberhub.memberships.models import MembershipPlan, MembershipTerm, MemberStatusChange
from memberhub.notifications.models import (
    DeviceToken,
    Notification,
    NotificationFeedState,
    NotificationPreference,
    NotificationSettingsRow,
    NotificationTemplate,
    RenewalNotice,
    Suppression,
)
from memberhub.organisations.models import Organisation
from memberhub.points.models import PointAccount, PointAllocation, PointBatch, PointTransaction
from memberhub.program.models import LoyaltyProgram
from memberhub.rewards.models import Reward, RewardClaim
from memberhub.search.models import SearchSyncState
from memberhub.sinks.models import EventSink, EventSinkDelivery
from memberhub.staff.models import StaffUser
from memberhub.tiers.models import Tier
from memberhub.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from memberhub.worker.models import WorkerHeartbeat

__all__ = [
    "AccountingMapping",
    "Activity",
    "Alert",
    "ApiKey",
    "ApprovalRequest",
    "AuditEntry",
    "Base",
    "BulkJob",
    "BulkJobChunk",
    "BulkJobRow",
    "ConsentChange",
    "CrmConflict",
    "CrmLink",
    "CrmSyncState",
    "DeviceToken",
    "EarningRule",
    "EarningRuleVersion",
    "Event",
    "EventSink",
    "EventSinkDelivery",
    "Export",
    "ExportPart",
    "ExportRun",
    "FinanceEntry",
    "IdempotencyRecord",
    "InboundEvent",
    "Integration",
    "IntegrationCall",
    "IntegrationIncident",
    "JourneyFiring",
    "Lead",
    "LoyaltyProgram",
    "MarketingContact",
    "MarketingSegment",
    "MarketingSyncState",
    "Member",
    "MemberStatusChange",
    "MembershipPlan",
    "MembershipTerm",
    "Notification",
    "NotificationFeedState",
    "NotificationPreference",
    "NotificationSettingsRow",
    "NotificationTemplate",
    "OAuthAuthorization",
    "Organisation",
    "PaymentRecord",
    "PointAccount",
    "PointAllocation",
    "PointBatch",
    "PointTransaction",
    "Reconciliation",
    "RenewalNotice",
    "Reward",
    "RewardClaim",
    "RuleAward",
    "SearchSyncState",
    "StaffUser",
    "Suppression",
    "SyncRun",
    "SyncRunRecord",
    "Tier",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WorkerHeartbeat",
]
