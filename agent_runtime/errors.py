"""The exception tree shared by the runtime, the orchestrator and the client.

Every class maps to exactly one HTTP status and one wire ``type`` (its class
name), so the side that receives an error envelope re-raises the class the
other side raised::

    PPIOAgentRuntimeError (500)
    ├── ValidationError (400)            malformed body, bad field, bad header
    │   └── UnsupportedMediaTypeError (415)
    ├── AuthenticationError (401)
    ├── PermissionDeniedError (403)
    ├── NotFoundError (404)              unknown route
    │   ├── TemplateNotFoundError (404)
    │   └── SessionNotFoundError (404)
    ├── MethodNotAllowedError (405)
    ├── SessionBusyError (409)
    ├── InvocationCancelledError (409)   the turn was interrupted by a newer one
    ├── RequestTooLargeError (413)
    ├── IdempotencyConflictError (422)   Idempotency-Key reused with another body
    ├── TooManyRequestsError (429)       mailbox full; carries ``retry_after``
    ├── InvocationError (500)            the agent raised
    ├── SandboxCrashedError (502)
    ├── ServiceUnavailableError (503)    not ready, or shutting down
    └── InvocationTimeoutError (504)

Example::

    >>> err = error_from_envelope(404, {"error": {"type": "SessionNotFoundError",
    ...                                           "message": "session s1 expired"}})
    >>> type(err).__name__, err.status_code
    ('SessionNotFoundError', 404)
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "IdempotencyConflictError",
    "InvocationCancelledError",
    "InvocationError",
    "InvocationTimeoutError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PPIOAgentRuntimeError",
    "PermissionDeniedError",
    "RequestTooLargeError",
    "SandboxCrashedError",
    "ServiceUnavailableError",
    "SessionBusyError",
    "SessionNotFoundError",
    "TemplateNotFoundError",
    "TooManyRequestsError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "error_class_for",
    "error_from_envelope",
]

_BY_TYPE: dict[str, type[PPIOAgentRuntimeError]] = {}
_BY_STATUS: dict[int, type[PPIOAgentRuntimeError]] = {}


class PPIOAgentRuntimeError(Exception):
    """Base of every error this package raises or carries over the wire.

    ``status_code`` is the HTTP status the error maps to; ``error_type`` its
    wire name (the class name). ``request_id`` is filled in when known.
    """

    status_code: ClassVar[int] = 500

    def __init__(
        self,
        message: str = "",
        *,
        request_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.details = details or {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _BY_TYPE[cls.__name__] = cls
        # The first class registered for a status is the generic one for it.
        _BY_STATUS.setdefault(cls.status_code, cls)

    @property
    def error_type(self) -> str:
        return type(self).__name__

    def to_envelope(self, request_id: str | None = None) -> dict[str, Any]:
        """The wire form: ``{"error": {"type", "message", "request_id", ...}}``."""
        body: dict[str, Any] = {
            "type": self.error_type,
            "message": self.message,
            "request_id": request_id or self.request_id,
        }
        if self.details:
            body["details"] = self.details
        return {"error": body}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


_BY_TYPE[PPIOAgentRuntimeError.__name__] = PPIOAgentRuntimeError
_BY_STATUS[500] = PPIOAgentRuntimeError


class ValidationError(PPIOAgentRuntimeError):
    """The request is malformed or a field is invalid (400)."""

    status_code = 400


class UnsupportedMediaTypeError(ValidationError):
    """The body's Content-Type is not JSON or msgpack (415)."""

    status_code = 415


class AuthenticationError(PPIOAgentRuntimeError):
    """Missing, unknown or badly signed credentials (401)."""

    status_code = 401


class PermissionDeniedError(PPIOAgentRuntimeError):
    """Valid credentials that may not do this (403)."""

    status_code = 403


class NotFoundError(PPIOAgentRuntimeError):
    """No such route or resource (404)."""

    status_code = 404


class TemplateNotFoundError(NotFoundError):
    """No template with this id, for this tenant (404)."""


class SessionNotFoundError(NotFoundError):
    """No live session with this id; the message says why it ended (404)."""


class MethodNotAllowedError(PPIOAgentRuntimeError):
    """The route exists but not for this HTTP method (405)."""

    status_code = 405


class SessionBusyError(PPIOAgentRuntimeError):
    """A turn is running and the caller asked not to queue (409)."""

    status_code = 409


class InvocationCancelledError(PPIOAgentRuntimeError):
    """The turn was cancelled, e.g. interrupted by a newer turn (409)."""

    status_code = 409


class RequestTooLargeError(PPIOAgentRuntimeError):
    """The body is larger than ``max_request_size`` (413)."""

    status_code = 413


class IdempotencyConflictError(PPIOAgentRuntimeError):
    """An Idempotency-Key was reused with a different body (422)."""

    status_code = 422


class TooManyRequestsError(PPIOAgentRuntimeError):
    """The session's mailbox is full; retry after ``retry_after`` seconds (429)."""

    status_code = 429

    def __init__(self, message: str = "", *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        self.details.setdefault("retry_after", retry_after)


class InvocationError(PPIOAgentRuntimeError):
    """The agent raised while handling the invocation (500)."""

    status_code = 500


class SandboxCrashedError(PPIOAgentRuntimeError):
    """The sandbox running the agent died during the turn (502)."""

    status_code = 502


class ServiceUnavailableError(PPIOAgentRuntimeError):
    """Not ready yet, shutting down, or the session is moving between nodes (503).

    ``retry_after`` (seconds, sent as ``Retry-After``) when a retry is expected to work.
    """

    status_code = 503

    def __init__(
        self, message: str = "", *, retry_after: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        if retry_after is not None:
            self.details.setdefault("retry_after", retry_after)


class InvocationTimeoutError(PPIOAgentRuntimeError):
    """The invocation ran past its deadline and was cancelled (504)."""

    status_code = 504


def error_class_for(error_type: str | None, status: int) -> type[PPIOAgentRuntimeError]:
    """The class named by ``error_type``, else the generic class for ``status``."""
    if error_type and (cls := _BY_TYPE.get(error_type)) is not None:
        return cls
    if (cls := _BY_STATUS.get(status)) is not None:
        return cls
    if 400 <= status < 500:
        return ValidationError
    return PPIOAgentRuntimeError


def error_from_envelope(status: int, body: Any) -> PPIOAgentRuntimeError:
    """Rebuild the exception a peer described in its error envelope.

    Understands this project's ``{"error": {"type", "message", ...}}`` and the
    bare ``{"error": "message"}`` of AgentCore and the original SDK.
    """
    error_type: str | None = None
    message = f"HTTP {status}"
    request_id: str | None = None
    details: dict[str, Any] | None = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        error_type = err.get("type") if isinstance(err.get("type"), str) else None
        message = str(err.get("message", message))
        request_id = err.get("request_id") if isinstance(err.get("request_id"), str) else None
        details = err.get("details") if isinstance(err.get("details"), dict) else None
    elif isinstance(err, str):
        message = err
    elif isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
    cls = error_class_for(error_type, status)
    exc = cls(message, request_id=request_id, details=details)
    if (
        isinstance(exc, (TooManyRequestsError, ServiceUnavailableError))
        and details
        and isinstance(details.get("retry_after"), (int, float))
    ):
        exc.retry_after = float(details["retry_after"])
    return exc
