from __future__ import annotations

import enum

import msgspec
import pytest

from ppio_sandbox.agent_runtime import InvocationRequest, InvocationResponse, PingStatus
from ppio_sandbox.agent_runtime.protocol import (
    PingResponse,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)


def test_invocation_request_keeps_unknown_fields_in_extra() -> None:
    body = {"prompt": "hi", "query": "q", "nested": {"a": [1, 2]}, "metadata": {"user_id": "u"}}
    req = InvocationRequest.from_dict(body)
    assert req.prompt == "hi"
    assert req.metadata == {"user_id": "u"}
    assert req.extra == {"query": "q", "nested": {"a": [1, 2]}}
    assert req.to_dict() == body


def test_invocation_request_known_field_of_wrong_type_goes_to_extra() -> None:
    req = InvocationRequest.from_dict({"data": "not a dict", "prompt": 3})
    assert req.data == {}
    assert req.prompt is None
    assert req.to_dict() == {"data": "not a dict", "prompt": 3}


def test_to_dict_like_keeps_fields_present_in_original_even_at_default() -> None:
    body = {"stream": False, "data": {}, "prompt": None, "x": 1}
    req = InvocationRequest.from_dict(body)
    assert req.to_dict() == {"x": 1}
    assert req.to_dict(like=body) == body


def test_seed_constructor_form() -> None:
    req = InvocationRequest(prompt="Hello, world!", data={"user_id": "123"})
    assert req.to_dict() == {"prompt": "Hello, world!", "data": {"user_id": "123"}}
    assert req.get("prompt") == "Hello, world!"
    assert req.metadata == {}


def test_invocation_response_round_trip() -> None:
    wire = encode_json(
        {
            "result": {"a": 1},
            "status": "success",
            "duration": 0.5,
            "metadata": {"request_id": "r", "session_id": "s"},
        }
    )
    resp = msgspec.json.decode(wire, type=InvocationResponse)
    assert resp.result == {"a": 1}
    assert resp.request_id == "r"
    assert resp.session_id == "s"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Healthy", PingStatus.HEALTHY),
        ("healthy", PingStatus.HEALTHY),
        ("HealthyBusy", PingStatus.HEALTHY_BUSY),
        ("healthy_busy", PingStatus.HEALTHY_BUSY),
        ("HEALTHY-BUSY", PingStatus.HEALTHY_BUSY),
        (PingStatus.HEALTHY_BUSY, PingStatus.HEALTHY_BUSY),
    ],
)
def test_ping_status_parse_normalises(given: object, expected: PingStatus) -> None:
    assert PingStatus.parse(given) is expected


def test_ping_status_parse_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown ping status"):
        PingStatus.parse("on fire")


def test_ping_response_to_dict_keeps_extra_and_wire_names() -> None:
    resp = PingResponse(status=PingStatus.HEALTHY_BUSY, time_of_last_update=7, extra={"k": "v"})
    assert resp.to_dict() == {"k": "v", "status": "HealthyBusy", "time_of_last_update": 7}


class Color(enum.Enum):
    RED = "red"


class Model:
    def model_dump(self) -> dict[str, int]:
        return {"x": 1}


def test_encoders_handle_objects_agents_commonly_return() -> None:
    value = {"enum": Color.RED, "set": {1}, "model": Model(), "other": object}
    decoded = decode_json(encode_json(value))
    assert decoded["enum"] == "red"
    assert decoded["set"] == [1]
    assert decoded["model"] == {"x": 1}
    assert decoded["other"] == str(object)
    assert decode_msgpack(encode_msgpack({"a": [1, "b"]})) == {"a": [1, "b"]}
