from __future__ import annotations

import pytest

from ppio_sandbox.agent_runtime import errors as E


def _leaf_classes() -> list[type[E.PPIOAgentRuntimeError]]:
    out = []
    for name in E.__all__:
        obj = getattr(E, name)
        if isinstance(obj, type) and issubclass(obj, E.PPIOAgentRuntimeError):
            out.append(obj)
    return out


@pytest.mark.parametrize("cls", _leaf_classes(), ids=lambda c: c.__name__)
def test_every_error_round_trips_through_its_envelope(cls: type[E.PPIOAgentRuntimeError]) -> None:
    err = cls("boom", request_id="r1")
    envelope = err.to_envelope()
    assert envelope["error"]["type"] == cls.__name__
    assert envelope["error"]["message"] == "boom"
    assert envelope["error"]["request_id"] == "r1"
    again = E.error_from_envelope(cls.status_code, envelope)
    assert type(again) is cls
    assert again.message == "boom"
    assert again.request_id == "r1"


def test_statuses_follow_the_design_table() -> None:
    expected = {
        "ValidationError": 400,
        "AuthenticationError": 401,
        "PermissionDeniedError": 403,
        "TemplateNotFoundError": 404,
        "SessionNotFoundError": 404,
        "SessionBusyError": 409,
        "RequestTooLargeError": 413,
        "IdempotencyConflictError": 422,
        "TooManyRequestsError": 429,
        "InvocationError": 500,
        "SandboxCrashedError": 502,
        "ServiceUnavailableError": 503,
        "InvocationTimeoutError": 504,
    }
    for name, status in expected.items():
        assert getattr(E, name).status_code == status, name
        assert issubclass(getattr(E, name), E.PPIOAgentRuntimeError)


def test_bare_error_string_from_peer_sdks_is_understood() -> None:
    err = E.error_from_envelope(404, {"error": "no such session"})
    assert type(err) is E.NotFoundError
    assert err.message == "no such session"


def test_unknown_type_falls_back_to_status_class() -> None:
    err = E.error_from_envelope(504, {"error": {"type": "SomethingNew", "message": "slow"}})
    assert type(err) is E.InvocationTimeoutError
    assert type(E.error_from_envelope(418, None)) is E.ValidationError
    assert type(E.error_from_envelope(599, "garbage")) is E.PPIOAgentRuntimeError


def test_retry_after_survives_the_wire() -> None:
    err = E.TooManyRequestsError("mailbox full", retry_after=3)
    again = E.error_from_envelope(429, err.to_envelope())
    assert isinstance(again, E.TooManyRequestsError)
    assert again.retry_after == 3.0
