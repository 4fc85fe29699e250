"""Sign-in attempts on one account at the same moment: every failure counts towards the
lock, and one TOTP code signs in once (on PostgreSQL, where transactions run side by side)."""

from __future__ import annotations

import asyncio

import pyotp

from memberhub.kit.actor import Actor
from memberhub.kit.clock import utcnow
from memberhub.kit.crypto import SecretBox
from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.staff import service as staff_service
from memberhub.staff.repository import StaffRepository
from memberhub.staff.service import SignInResult
from tests.console.support import create_staff_user

EMAIL = "ana@example.org"


async def _attempt(db: Database, settings: Settings, password: str) -> SignInResult:
    async with db.transaction() as session:
        outcome = await staff_service.check_password(
            session, settings, Actor.system("test"), email=EMAIL, password=password
        )
        return outcome.result


async def test_wrong_passwords_at_once_each_count_towards_the_lock(
    db: Database, settings: Settings
) -> None:
    staff_id = await create_staff_user(db, email=EMAIL)
    attempts = settings.staff_lockout_attempts
    assert attempts >= 3
    results = await asyncio.gather(
        *(_attempt(db, settings, "a wrong guess") for _ in range(attempts - 1))
    )
    assert set(results) == {SignInResult.INVALID}
    async with db.transaction() as session:
        staff = await StaffRepository(session).get_by_public_id(staff_id)
        assert staff is not None
        assert (staff.failed_sign_ins, staff.locked_until) == (attempts - 1, None)
    # Two more at once: whichever counts last reaches the limit and locks the account.
    last_two = await asyncio.gather(
        _attempt(db, settings, "a wrong guess"), _attempt(db, settings, "a wrong guess")
    )
    assert SignInResult.LOCKED in last_two, last_two
    async with db.transaction() as session:
        staff = await StaffRepository(session).get_by_public_id(staff_id)
        assert staff is not None
        assert staff.locked_until is not None


async def test_one_totp_code_used_twice_at_once_signs_in_once(
    db: Database, settings: Settings
) -> None:
    staff_id = await create_staff_user(db, email=EMAIL)
    box = SecretBox(settings.resolved_secret_key)
    secret = pyotp.random_base32()
    async with db.transaction() as session:
        staff = await StaffRepository(session).get_by_public_id(staff_id)
        assert staff is not None
        staff.totp_secret = box.encrypt(secret)
    code = pyotp.TOTP(secret).now()

    async def use_code() -> SignInResult:
        async with db.transaction() as session:
            staff = await StaffRepository(session).get_by_public_id(staff_id)
            assert staff is not None
            outcome = await staff_service.check_second_factor(
                session, settings, box, Actor.system("test"), staff, code, utcnow()
            )
            return outcome.result

    results = await asyncio.gather(use_code(), use_code())
    assert sorted(r.value for r in results) == ["invalid", "signed_in"], results
