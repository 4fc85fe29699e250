from __future__ import annotations

from fastapi import APIRouter

from memberhub.auth.dependencies import ProgramReader, ProgramWriter
from memberhub.exports import service as exports_service
from memberhub.kit.http import ERROR_RESPONSES, DbSession, UnitOfWorkRoute
from memberhub.program import service
from memberhub.program.schemas import ProgramOut, ProgramPatch

router = APIRouter(
    prefix="/api/v1/program",
    tags=["program"],
    route_class=UnitOfWorkRoute,
    responses=ERROR_RESPONSES,
)


@router.get("")
async def get_program(session: DbSession, principal: ProgramReader) -> ProgramOut:
    """The loyalty program's settings (defaults until first changed)."""
    return service.to_out(await service.get_program(session))


@router.patch("")
async def update_program(
    payload: ProgramPatch, session: DbSession, principal: ProgramWriter
) -> ProgramOut:
    """Change earn rate, expiry policy, pending period, negative-balance policy, time zone,
    point value, staff limits per role or alert thresholds."""
    previous_zone = (await service.get_program(session)).timezone
    program = await service.update_program(session, principal, payload)
    if program.timezone != previous_zone:
        await exports_service.reschedule_all(session, program.timezone)
    return service.to_out(program)
