from __future__ import annotations

from ppio_sandbox.agent_runtime.sse import encode_event, encode_raw_event, iter_events


def test_encode_event_frames_json_with_id_and_optional_name() -> None:
    assert encode_event(1, "Chunk 1") == b'id: 1\ndata: "Chunk 1"\n\n'
    assert encode_event(2, {"a": "x\ny"}, "done") == b'event: done\nid: 2\ndata: {"a":"x\\ny"}\n\n'
    assert encode_raw_event(None, b"{}") == b"data: {}\n\n"


def test_iter_events_parses_what_encode_writes() -> None:
    wire = (encode_event(1, "a") + encode_event(2, {"b": 1}, "done")).decode()
    events = list(iter_events(iter(wire.split("\n"))))
    assert [(e.event, e.id, e.json()) for e in events] == [
        ("message", "1", "a"),
        ("done", "2", {"b": 1}),
    ]


def test_iter_events_skips_comments_and_joins_multiline_data() -> None:
    lines = [": keep-alive", "data: line1", "data: line2", "", "data: tail"]
    events = list(iter_events(iter(lines)))
    assert [e.data for e in events] == ["line1\nline2", "tail"]
