"""Error tracking with Sentry (`SENTRY_DSN`): unhandled errors of the API and the worker
are sent with the request id, never with personal data or credentials. Without a DSN the
SDK is not even imported (a tenth of a second of every process's start)."""

from __future__ import annotations

import sys
from typing import Any

from memberhub import __version__
from memberhub.settings import Settings

# Headers that carry credentials; Sentry drops some by default, these always go.
_SECRET_HEADERS = frozenset({"authorization", "cookie", "x-api-key", "idempotency-key"})


def _scrub(event: dict[str, Any], _hint: dict[str, Any]) -> dict[str, Any] | None:
    request = event.get("request")
    if isinstance(request, dict):
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {
                name: ("[Filtered]" if name.lower() in _SECRET_HEADERS else value)
                for name, value in headers.items()
            }
        request.pop("data", None)  # bodies hold personal data and keys
        request.pop("cookies", None)
    return event


def configure_error_tracking(settings: Settings) -> bool:
    """Start Sentry when `SENTRY_DSN` is set; True when it was started."""
    if not settings.sentry_dsn:
        return False
    import sentry_sdk

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=str(settings.env),
        release=f"memberhub@{__version__}",
        max_request_body_size="never",
        include_local_variables=False,  # frames hold keys and personal data
        traces_sample_rate=settings.sentry_traces_sample_rate,
        before_send=_scrub,  # type: ignore[arg-type]
    )
    return True


def capture_exception(exc: BaseException) -> None:
    """Send `exc` to Sentry, where it was started (a no-op where it was not)."""
    sentry_sdk = sys.modules.get("sentry_sdk")
    if sentry_sdk is not None:
        sentry_sdk.capture_exception(exc)
