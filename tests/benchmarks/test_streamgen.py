"""The streaming benchmark's parts against real servers: the SSE reader
(:mod:`benchmarks.streamgen`), the floor and the runtime's streaming agent on
both backends, and a peer that cannot be installed being skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import peers, procs, streamgen
from benchmarks.servers import BASELINE_SSE, RUNTIME_STREAM, ServerSpec, serve
from benchmarks.streamgen import _count_events

BACKENDS = ["asyncio", "trio"]


def _read(spec: ServerSpec, backend: str, tmp_path: Path, *, count: int, chunks: int) -> Any:
    with serve(
        spec, backend, cpus=None, logdir=tmp_path, startup_timeout=30.0, stop_timeout=5.0
    ) as server:
        opts = streamgen.Options(
            port=server.port,
            body=b'{"count":%d}' % count,
            readers=3,
            chunks=chunks,
            warmup=0.1,
            duration=0.4,
            server_pid=server.pid,
        )
        return procs.run_json(streamgen.command(opts), cpus=None, timeout=30.0)


def test_count_events_skips_done_and_flags_error() -> None:
    assert _count_events(b'data: "a"\n\nid: 2\ndata: "b"\n\n') == (2, False)
    assert _count_events(b'id: 3\ndata: "c"\n\nevent: done\nid: 4\ndata: {}\n\n') == (1, False)
    assert _count_events(b'event: error\ndata: {"error": "x"}\n\n') == (0, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_the_floor_to_the_end(backend: str, tmp_path: Path) -> None:
    result = _read(BASELINE_SSE, backend, tmp_path, count=50, chunks=50)
    assert result["errors"] == 0, result["error_kinds"]
    assert result["streams"] > 0
    assert result["chunks"] >= 50
    assert result["ttfc_samples"] > 0
    assert 0 < result["ttfc_p50"] <= result["ttfc_p99"]
    assert result["stuck_readers"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_the_runtime_stream_without_counting_done(backend: str, tmp_path: Path) -> None:
    result = _read(RUNTIME_STREAM, backend, tmp_path, count=50, chunks=50)
    assert result["errors"] == 0, result["error_kinds"]
    assert result["streams"] > 0


def test_a_stream_of_the_wrong_length_is_an_error(tmp_path: Path) -> None:
    result = _read(BASELINE_SSE, "asyncio", tmp_path, count=40, chunks=50)
    assert result["errors"] > 0
    assert set(result["error_kinds"]) == {"short stream"}
    assert result["streams"] == 0


def test_a_peer_that_cannot_be_installed_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PPIO_BENCH_CACHE", str(tmp_path))
    # No registry and no local wheels: as on a machine without a network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setattr(peers, "_FAILED", {})
    lines: list[str] = []
    found = peers.ensure(peers.PEERS[0], lines.append)
    assert isinstance(found, str)
    assert found.startswith("ppio-sandbox-2.1.0 skipped: cannot install ppio-sandbox==2.1.0")
    assert lines[-1] == found
    assert not (tmp_path / "peers" / peers.PEERS[0].key).exists()  # no half-made venv left
    assert peers.ensure(peers.PEERS[0], lines.append) == found  # not tried twice
    assert len(lines) == 2
