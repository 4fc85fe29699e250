"""The console's home page, and its stylesheet."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.responses import Response

from memberhub.console.web import ConsoleRoute, SignedInStaff, render
from memberhub.kit.errors import NotFound

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)
static_router = APIRouter(prefix="/console/static", include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
STATIC_FILES = {"console.css": "text/css"}


@router.get("")
async def home(request: Request, signed_in: SignedInStaff) -> Response:
    return render(
        request,
        "home.html",
        {"title": "Home", "staff": signed_in.staff, "principal": signed_in.principal},
    )


@static_router.get("/{name}")
async def static_file(name: str) -> Response:
    """The console's own assets, shipped in the package (no CDN)."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise NotFound("No such file.")
    return FileResponse(
        STATIC_DIR / name,
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=3600"},
    )
