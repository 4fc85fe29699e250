"""Staff accounts and their sign-in.

A staff user acts with a `Principal` built exactly as an API key's of the same role and
organisation would be, with the staff public id (`stf_…`) as its actor: whatever a staff
user does in the console is checked and recorded as the API would check and record it.

Sign-in failures are flushed like any write: the console's sign-in route commits them even
though it answers 401, so a lockout outlives the request that caused it.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from memberhub.audit.service import record_write
from memberhub.auth.principal import Principal
from memberhub.auth.roles import ROLE_SCOPES, Role
from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.errors import Conflict, NotFound, ValidationFailed
from memberhub.kit.ids import new_public_id
from memberhub.kit.types import valid_name
from memberhub.organisations.models import Organisation
from memberhub.organisations.repository import OrganisationRepository
from memberhub.settings import Settings
from memberhub.staff import passwords
from memberhub.staff.models import EndedConsoleSession, StaffUser
from memberhub.staff.repository import StaffRepository

STAFF_ROLES = (Role.ADMIN, Role.MANAGER, Role.SUPPORT_AGENT)
TOTP_ISSUER = "memberhub"


@dataclass(frozen=True)
class CreatedStaff:
    staff: StaffUser
    # Generated when no password was given; shown once, only its hash is kept.
    one_time_password: str | None


def _staff_role(role: str) -> Role:
    if role not in {r.value for r in STAFF_ROLES}:
        raise ValidationFailed(
            f"'{role}' is not a staff role.",
            details={"field": "role", "allowed": [r.value for r in STAFF_ROLES]},
        )
    return Role(role)


async def _organisation_id(
    session: AsyncSession, principal: Principal, organisation_public_id: str | None
) -> int | None:
    """The organisation named, within the caller's reach; an org-bound caller cannot give
    out access to everything by leaving it out."""
    if organisation_public_id is None:
        principal.require_organisation(None)
        return None
    organisation = await OrganisationRepository(session).get_by_public_id(organisation_public_id)
    if organisation is None or not principal.can_see_organisation(organisation.id):
        raise NotFound(f"Organisation {organisation_public_id} does not exist.")
    return organisation.id


async def staff_organisation(session: AsyncSession, staff: StaffUser) -> str | None:
    """The public id of the staff user's organisation, if any."""
    if staff.organisation_id is None:
        return None
    organisation = await session.get(Organisation, staff.organisation_id)
    return organisation.public_id if organisation is not None else None


async def create_staff(
    session: AsyncSession,
    principal: Principal,
    *,
    email: str,
    name: str,
    role: str,
    organisation_public_id: str | None = None,
    password: str | None = None,
) -> CreatedStaff:
    staff_role = _staff_role(role)
    principal.require_grantable(ROLE_SCOPES[staff_role], "a staff account")
    name = valid_name(name)
    try:
        email = validate_email(email.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise ValidationFailed(f"'{email[:100]}' is not an email address.") from exc
    organisation_id = await _organisation_id(session, principal, organisation_public_id)
    if await StaffRepository(session).get_by_email(email) is not None:
        raise Conflict("A staff account with this email exists.", code="DUPLICATE_STAFF_EMAIL")
    one_time = None
    if password is None:
        password = one_time = passwords.generate_password()
    staff = StaffUser(
        public_id=new_public_id("stf"),
        email=email,
        name=name,
        role=staff_role.value,
        organisation_id=organisation_id,
        active=True,
        password_hash=passwords.hash_password(password),
        failed_sign_ins=0,
        session_version=1,
    )
    session.add(staff)
    await session.flush()
    record_write(
        session,
        principal.actor,
        action="staff.create",
        object_type="staff",
        object_id=staff.public_id,
        changes={
            "email": {"before": None, "after": email},
            "role": {"before": None, "after": staff_role.value},
            "organisation_id": {"before": None, "after": organisation_public_id},
        },
    )
    return CreatedStaff(staff=staff, one_time_password=one_time)


async def get_staff(session: AsyncSession, principal: Principal, public_id: str) -> StaffUser:
    staff = await StaffRepository(session).get_by_public_id(public_id)
    if staff is None or not principal.can_see_organisation(staff.organisation_id):
        raise NotFound(f"Staff user {public_id} does not exist.", code="STAFF_NOT_FOUND")
    return staff


async def update_staff(
    session: AsyncSession,
    principal: Principal,
    public_id: str,
    *,
    name: str | None = None,
    role: str | None = None,
    move_organisation: bool = False,
    organisation_public_id: str | None = None,
    active: bool | None = None,
) -> StaffUser:
    """Change what is given; with `move_organisation`, the organisation becomes
    `organisation_public_id` (None: installation-wide)."""
    staff = await get_staff(session, principal, public_id)
    changes: dict[str, dict[str, object]] = {}
    if name is not None and name != staff.name:
        changes["name"] = {"before": staff.name, "after": name}
        staff.name = name
    if role is not None and role != staff.role:
        principal.require_grantable(ROLE_SCOPES[_staff_role(role)], "a staff account")
        changes["role"] = {"before": staff.role, "after": _staff_role(role).value}
        staff.role = role
    if move_organisation:
        organisation_id = await _organisation_id(session, principal, organisation_public_id)
        if organisation_id != staff.organisation_id:
            changes["organisation_id"] = {
                "before": await staff_organisation(session, staff),
                "after": organisation_public_id,
            }
            staff.organisation_id = organisation_id
    if active is not None and active != staff.active:
        if not active and staff.public_id == principal.key_public_id:
            raise Conflict("You cannot deactivate your own account.", code="OWN_ACCOUNT")
        changes["active"] = {"before": staff.active, "after": active}
        staff.active = active
    if changes.keys() & {"role", "organisation_id", "active"}:
        # Access changed: sessions signed in before it end (a new name changes no access).
        staff.session_version += 1
    if changes:
        record_write(
            session,
            principal.actor,
            action="staff.update",
            object_type="staff",
            object_id=staff.public_id,
            changes=changes,
        )
    return staff


async def unlock_staff(session: AsyncSession, principal: Principal, public_id: str) -> StaffUser:
    staff = await get_staff(session, principal, public_id)
    if staff.locked_until is None and staff.failed_sign_ins == 0:
        return staff
    record_write(
        session,
        principal.actor,
        action="staff.unlock",
        object_type="staff",
        object_id=staff.public_id,
        changes={"failed_sign_ins": {"before": staff.failed_sign_ins, "after": 0}},
    )
    staff.failed_sign_ins = 0
    staff.locked_until = None
    return staff


async def principal_for(
    session: AsyncSession,
    staff: StaffUser,
    *,
    request_id: str | None = None,
    client_ip: str | None = None,
) -> Principal:
    """What a signed-in staff user may do: a key's permissions for the same role and
    organisation, acting as `stf_…`."""
    visible = None
    if staff.organisation_id is not None:
        visible = await OrganisationRepository(session).subtree_ids(staff.organisation_id)
    role = Role(staff.role)
    return Principal(
        key_id=0,
        key_public_id=staff.public_id,
        role=role,
        scopes=ROLE_SCOPES[role],
        organisation_id=staff.organisation_id,
        visible_organisation_ids=visible,
        request_id=request_id,
        client_ip=client_ip,
    )


# --- Password sign-in -----------------------------------------------------------------


class SignInResult(enum.Enum):
    SIGNED_IN = "signed_in"
    NEEDS_SECOND_FACTOR = "needs_second_factor"
    INVALID = "invalid"
    LOCKED = "locked"


@dataclass(frozen=True)
class SignInOutcome:
    result: SignInResult
    staff: StaffUser | None = None


def is_locked(staff: StaffUser, now: datetime) -> bool:
    return staff.locked_until is not None and staff.locked_until > now


async def _record_failure(
    session: AsyncSession, staff: StaffUser, settings: Settings, now: datetime, actor: Actor
) -> SignInOutcome:
    staff.failed_sign_ins += 1
    if staff.failed_sign_ins >= settings.staff_lockout_attempts:
        staff.locked_until = now + timedelta(minutes=settings.staff_lockout_minutes)
        staff.failed_sign_ins = 0
        record_write(
            session,
            actor,
            action="staff.lock",
            object_type="staff",
            object_id=staff.public_id,
            changes={"locked_until": {"before": None, "after": staff.locked_until.isoformat()}},
        )
        await session.flush()
        return SignInOutcome(SignInResult.LOCKED, staff)
    await session.flush()
    return SignInOutcome(SignInResult.INVALID, staff)


async def record_wrong_password(
    session: AsyncSession, settings: Settings, staff: StaffUser, now: datetime | None = None
) -> bool:
    """A wrong password given while signed in (to change it, or to turn off two-factor
    sign-in) counts towards the lock as a failed sign-in does, so a session left open is no
    way to guess it; a lock also ends every session of the account. True when it locked."""
    actor = Actor(id=staff.public_id)
    await session.refresh(staff, with_for_update=True)
    outcome = await _record_failure(session, staff, settings, now or utcnow(), actor)
    if outcome.result is SignInResult.LOCKED:
        staff.session_version += 1
        return True
    return False


async def check_password(
    session: AsyncSession,
    settings: Settings,
    actor: Actor,
    *,
    email: str,
    password: str,
    now: datetime | None = None,
) -> SignInOutcome:
    """The first step of a password sign-in. A locked account is refused whatever the
    password, and a wrong password counts towards its lock."""
    now = now or utcnow()
    staff = await StaffRepository(session).get_by_email(email, for_update=True)
    valid = passwords.verify_password(staff.password_hash if staff else None, password)
    if staff is None or not staff.active:
        return SignInOutcome(SignInResult.INVALID)
    if is_locked(staff, now):
        return SignInOutcome(SignInResult.LOCKED, staff)
    if not valid:
        return await _record_failure(session, staff, settings, now, actor)
    if staff.totp_secret is not None:
        return SignInOutcome(SignInResult.NEEDS_SECOND_FACTOR, staff)
    return SignInOutcome(SignInResult.SIGNED_IN, staff)


async def check_second_factor(
    session: AsyncSession,
    settings: Settings,
    box: SecretBox,
    actor: Actor,
    staff: StaffUser,
    code: str,
    now: datetime | None = None,
) -> SignInOutcome:
    now = now or utcnow()
    # Locked and reloaded: two attempts at once can neither both use one code nor lose a
    # failure from the count towards the lock.
    await session.refresh(staff, with_for_update=True)
    if not staff.active:
        return SignInOutcome(SignInResult.INVALID)
    if is_locked(staff, now):
        return SignInOutcome(SignInResult.LOCKED, staff)
    if staff.totp_secret is None or not _use_totp_code(
        staff, box.decrypt(staff.totp_secret), code, now
    ):
        return await _record_failure(session, staff, settings, now, actor)
    return SignInOutcome(SignInResult.SIGNED_IN, staff)


async def end_session(
    session: AsyncSession,
    actor: Actor,
    staff: StaffUser,
    session_digest: str,
    *,
    expires_at: datetime,
) -> None:
    """Record a console session as signed out, so a copy of its cookie signs no one in
    until it would have expired; sessions past that are forgotten meanwhile."""
    now = utcnow()
    await session.execute(delete(EndedConsoleSession).where(EndedConsoleSession.expires_at < now))
    if expires_at > now and await session.get(EndedConsoleSession, session_digest) is None:
        try:
            async with session.begin_nested():
                session.add(
                    EndedConsoleSession(
                        session_digest=session_digest, staff_id=staff.id, expires_at=expires_at
                    )
                )
        except IntegrityError:
            pass  # ended at the same moment by another request (a second click)
    record_write(
        session,
        actor,
        action="staff.sign_out",
        object_type="staff",
        object_id=staff.public_id,
        changes={},
    )


async def session_ended(session: AsyncSession, session_digest: str) -> bool:
    return await session.get(EndedConsoleSession, session_digest) is not None


def record_sign_in(session: AsyncSession, actor: Actor, staff: StaffUser, method: str) -> None:
    staff.failed_sign_ins = 0
    staff.locked_until = None
    staff.last_sign_in_at = utcnow()
    record_write(
        session,
        actor,
        action="staff.sign_in",
        object_type="staff",
        object_id=staff.public_id,
        changes={"method": {"before": None, "after": method}},
    )


# --- The account's own settings --------------------------------------------------------


async def change_password(
    session: AsyncSession, staff: StaffUser, *, current: str, new: str
) -> None:
    if not passwords.verify_password(staff.password_hash, current):
        raise ValidationFailed(
            "The current password is not right.",
            details={"field": "current_password"},
            code="WRONG_PASSWORD",
        )
    staff.password_hash = passwords.hash_password(new)
    staff.session_version += 1
    record_write(
        session,
        Actor(id=staff.public_id),
        action="staff.password_change",
        object_type="staff",
        object_id=staff.public_id,
        changes={},
    )


def _totp_step(secret: str, code: str, now: datetime) -> int | None:
    """The time step whose code `code` is (one step either way allowed, for a phone's clock
    a little off), or None."""
    code = code.strip().replace(" ", "")
    if not (code.isascii() and code.isdigit() and len(code) == 6):
        return None
    totp = pyotp.TOTP(secret)
    current = totp.timecode(now)
    for step in (current, current - 1, current + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def _use_totp_code(staff: StaffUser, secret: str, code: str, now: datetime) -> bool:
    """Whether `code` is valid and newer than the last one used: a code seen once (read
    over a shoulder, say) cannot sign in again."""
    step = _totp_step(secret, code, now)
    if step is None or (staff.totp_last_step is not None and step <= staff.totp_last_step):
        return False
    staff.totp_last_step = step
    return True


def start_totp(box: SecretBox, staff: StaffUser) -> tuple[str, str]:
    """A new secret, kept pending until a code from it is confirmed; returned (with its
    otpauth:// URI) to be shown once."""
    if staff.totp_secret is not None:
        raise Conflict("Two-factor sign-in is already on.", code="TOTP_ENABLED")
    secret = pyotp.random_base32()
    staff.totp_pending_secret = box.encrypt(secret)
    return secret, _provisioning_uri(staff, secret)


def pending_totp(box: SecretBox, staff: StaffUser) -> tuple[str, str] | None:
    """The secret being enrolled (with its URI), to show again after a mistyped code: a
    new secret would break the entry already added to the authenticator."""
    if staff.totp_secret is not None or staff.totp_pending_secret is None:
        return None
    secret = box.decrypt(staff.totp_pending_secret)
    return secret, _provisioning_uri(staff, secret)


def _provisioning_uri(staff: StaffUser, secret: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=staff.email, issuer_name=TOTP_ISSUER)


def confirm_totp(
    session: AsyncSession, box: SecretBox, staff: StaffUser, code: str, now: datetime | None = None
) -> None:
    if staff.totp_pending_secret is None:
        raise Conflict("Start enrolling first.", code="TOTP_NOT_STARTED")
    secret = box.decrypt(staff.totp_pending_secret)
    if not _use_totp_code(staff, secret, code, now or utcnow()):
        raise ValidationFailed(
            "The code does not match; check the device's clock and try the next code.",
            details={"field": "code"},
            code="WRONG_CODE",
        )
    staff.totp_secret = staff.totp_pending_secret
    staff.totp_pending_secret = None
    staff.session_version += 1
    record_write(
        session,
        Actor(id=staff.public_id),
        action="staff.totp_enable",
        object_type="staff",
        object_id=staff.public_id,
        changes={},
    )


def disable_totp(session: AsyncSession, staff: StaffUser, *, password: str) -> None:
    if staff.totp_secret is None:
        raise Conflict("Two-factor sign-in is not on.", code="TOTP_DISABLED")
    if not passwords.verify_password(staff.password_hash, password):
        raise ValidationFailed(
            "The password is not right.", details={"field": "password"}, code="WRONG_PASSWORD"
        )
    staff.totp_secret = None
    staff.totp_pending_secret = None
    staff.totp_last_step = None
    staff.session_version += 1
    record_write(
        session,
        Actor(id=staff.public_id),
        action="staff.totp_disable",
        object_type="staff",
        object_id=staff.public_id,
        changes={},
    )


# --- Single sign-on ---------------------------------------------------------------------


async def staff_for_sso(
    session: AsyncSession, settings: Settings, actor: Actor, email: str
) -> StaffUser | None:
    """The active staff user with this (verified) email, created with the configured default
    role on a first sign-in when allowed; None when the email may not sign in."""
    email = email.strip().lower()
    domain = email.rpartition("@")[2]
    if settings.oidc_email_domains and domain not in settings.oidc_email_domains:
        return None
    staff = await StaffRepository(session).get_by_email(email)
    if staff is None and settings.oidc_auto_create_role is not None:
        created = await create_staff(
            session,
            Principal.system(actor),
            email=email,
            name=email.partition("@")[0][:100] or email,
            role=settings.oidc_auto_create_role,
        )
        # SSO only: the generated password is never shown, so it can never be used.
        created.staff.password_hash = None
        return created.staff
    if staff is None or not staff.active:
        return None
    return staff
