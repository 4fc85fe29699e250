"""The one error hierarchy. Services raise these; one handler renders them."""

from __future__ import annotations

from typing import Any


class MemberhubError(Exception):
    code = "ERROR"
    status_code = 400
    default_message = "The request could not be completed."

    def __init__(
        self,
        message: str | None = None,
        *,
        details: dict[str, Any] | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details or {}
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.headers = headers or {}
        super().__init__(self.message)


class BadRequest(MemberhubError):
    code = "BAD_REQUEST"
    status_code = 400


class Unauthorized(MemberhubError):
    code = "UNAUTHORIZED"
    status_code = 401
    default_message = "A valid API key is required."


class Forbidden(MemberhubError):
    code = "FORBIDDEN"
    status_code = 403
    default_message = "This API key may not perform this action."


class NotFound(MemberhubError):
    code = "NOT_FOUND"
    status_code = 404
    default_message = "The requested object does not exist."


class Conflict(MemberhubError):
    code = "CONFLICT"
    status_code = 409
    default_message = "The request conflicts with the current state."


class InvalidTransition(Conflict):
    code = "INVALID_TRANSITION"


class PreconditionFailed(MemberhubError):
    code = "PRECONDITION_FAILED"
    status_code = 412
    default_message = "The object changed since the version given in If-Match."


class ValidationFailed(MemberhubError):
    code = "VALIDATION_ERROR"
    status_code = 422
    default_message = "The request is not valid."


class IdempotencyKeyReused(MemberhubError):
    code = "IDEMPOTENCY_KEY_REUSED"
    status_code = 422
    default_message = "This Idempotency-Key was already used with a different request."


class RateLimited(MemberhubError):
    code = "RATE_LIMITED"
    status_code = 429
    default_message = "Too many requests; retry later."


class ServiceUnavailable(MemberhubError):
    code = "SERVICE_UNAVAILABLE"
    status_code = 503
    default_message = "The service is temporarily unavailable."
