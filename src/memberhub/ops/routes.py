from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import func, select, text

from memberhub.events.models import Event
from memberhub.kit.clock import utcnow
from memberhub.ops.metrics import database_figures
from memberhub.webhooks.delivery import queue_stats
from memberhub.worker import heartbeat

router = APIRouter(tags=["operations"])


async def _worker_age_seconds(request: Request) -> float | None:
    async with request.app.state.db.transaction(read_only=True) as session:
        last = await heartbeat.latest(session)
    if last is None:
        return None
    return max(0.0, (utcnow() - last).total_seconds())


def stale_after_seconds(interval_seconds: float) -> float:
    """A worker beats every tick; missing this many seconds of beats means none is working."""
    return max(60.0, 6 * interval_seconds)


@router.get("/health", responses={503: {"description": "The database is unreachable"}})
async def health(request: Request) -> JSONResponse:
    """`ok`; `degraded` (still 200) when no worker has beaten for a while, so scheduled jobs,
    webhook deliveries and the event sequencer are not running; 503 without the database."""
    body: dict[str, Any] = {"status": "ok", "database": "ok"}
    try:
        async with request.app.state.db.transaction(read_only=True) as session:
            await session.execute(text("SELECT 1"))
        age = await _worker_age_seconds(request)
    except Exception as exc:
        body.update(status="unavailable", database=f"unreachable ({type(exc).__name__})")
        return JSONResponse(body, status_code=503)
    stale_after = stale_after_seconds(request.app.state.settings.worker_interval_seconds)
    working = age is not None and age <= stale_after
    body["worker"] = {
        "status": "ok" if working else ("stale" if age is not None else "never seen"),
        "heartbeat_age_seconds": None if age is None else round(age, 1),
        "stale_after_seconds": stale_after,
        "embedded": request.app.state.embedded_worker,
    }
    if not working:
        body["status"] = "degraded"
    return JSONResponse(body)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of every process of this service (`ops/metrics.py`), and queue
    figures read from the database."""
    app_metrics = request.app.state.metrics
    async with request.app.state.db.transaction(read_only=True) as session:
        pending = await session.scalar(
            select(func.count()).select_from(Event).where(Event.dispatched_at.is_(None))
        )
        queue = await queue_stats(session)
    now = utcnow()
    figures = database_figures(
        events_pending=pending or 0,
        worker_heartbeat_age=await _worker_age_seconds(request),
        webhook_queue=[
            (endpoint, depth, max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
            for endpoint, depth, oldest in queue
        ],
    )
    return Response(app_metrics.latest(figures), media_type=CONTENT_TYPE_LATEST)
