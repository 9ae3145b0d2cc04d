"""Child processes: CPU pinning, a parent-death signal, and always stopping them."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import ROOT

__all__ = ["Pinning", "plan_pinning", "run_json", "spawn", "stop"]

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the server and the load generator may use (``None``: any)."""

    server: frozenset[int] | None
    loadgen: frozenset[int] | None
    method: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "server": sorted(self.server) if self.server is not None else None,
            "loadgen": sorted(self.loadgen) if self.loadgen is not None else None,
            "method": self.method,
        }


def plan_pinning(enabled: bool) -> Pinning:
    """Server on the first usable CPU, load generator on the second, if possible."""
    if not enabled:
        return Pinning(None, None, "disabled (--no-pin)")
    if not hasattr(os, "sched_setaffinity"):
        return Pinning(None, None, "unavailable (no os.sched_setaffinity)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning(None, None, f"unavailable (only CPU {cpus} usable)")
    return Pinning(frozenset(cpus[:1]), frozenset(cpus[1:2]), "os.sched_setaffinity")


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _libc_prctl()


def _preexec(cpus: frozenset[int] | None) -> Callable[[], None]:
    """Runs in the child before exec: pin it; make it die with the harness."""

    def setup() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


def child_env() -> dict[str, str]:
    """The harness's environment with the repository root importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def spawn(
    argv: Sequence[str],
    *,
    cpus: frozenset[int] | None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the repository root, pinned to ``cpus``, in its own session.

    Its own session keeps a terminal's Ctrl-C away from it: the harness
    decides when it stops.
    """
    return subprocess.Popen(
        list(argv),
        cwd=ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_preexec(cpus),
    )


def stop(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; return the exit code.

    A Ctrl-C while waiting kills the process at once before propagating.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.terminate()
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5.0)
    except BaseException:
        proc.kill()
        proc.wait(5.0)
        raise


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    cpus: frozenset[int] | None,
    log: Path,
    stop_timeout: float,
) -> Iterator[subprocess.Popen[bytes]]:
    """A process with stdout and stderr to ``log``, stopped however the block exits."""
    with log.open("wb") as out:
        proc = spawn(argv, cpus=cpus, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop(proc, stop_timeout)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_json(argv: Sequence[str], *, cpus: frozenset[int] | None, timeout: float) -> Any:
    """Run a command to completion (killed after ``timeout``); parse its stdout as JSON."""
    proc = spawn(argv, cpus=cpus, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{argv[2:4]} did not finish within {timeout:g} s") from None
    finally:
        stop(proc, 2.0)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {proc.returncode}: {err.decode(errors='replace')}"
        )
    return json.loads(out)
