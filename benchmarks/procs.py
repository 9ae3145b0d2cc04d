"""Child processes: CPU pinning, a parent-death signal, and always stopping them.

Every process :func:`spawn` starts is registered until :func:`stop` has
stopped it; :func:`stop_all` stops whatever is left (the harness calls it
on Ctrl-C). Stopping a process also ends the descendants it leaves behind
(an orchestrator's or a probe's process sandboxes run in sessions of their
own, so no signal to a process group reaches them).
"""

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

__all__ = [
    "Pinning",
    "descendants",
    "live",
    "plan_pinning",
    "run_json",
    "spawn",
    "stop",
    "stop_all",
]

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


def _preexec(cpus: frozenset[int] | None, death_signal: int) -> Callable[[], None]:
    """Runs in the child before exec: pin it; make it die with the harness."""

    def setup() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, death_signal)

    return setup


def child_env() -> dict[str, str]:
    """The harness's environment with the repository root importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


_LIVE: dict[int, subprocess.Popen[Any]] = {}
"""Started and not yet stopped, by pid."""


def live() -> list[int]:
    """Pids of the processes started and not yet stopped."""
    return sorted(_LIVE)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (``None``: gone), to tell pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        return int(stat.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def descendants(pid: int) -> set[tuple[int, int]]:
    """Children, grandchildren, ... of ``pid`` as (pid, start time) (Linux ``/proc``)."""
    found: set[tuple[int, int]] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children", encoding="ascii") as f:
                    children = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            for child in children:
                started = _start_time(child)
                if started is not None and (child, started) not in found:
                    found.add((child, started))
                    todo.append(child)
    return found


def _kill_leftovers(family: set[tuple[int, int]]) -> None:
    """SIGKILL the processes of ``family`` still alive (same pid, same start time)."""
    for pid, started in family:
        if _start_time(pid) == started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def spawn(
    argv: Sequence[str],
    *,
    cpus: frozenset[int] | None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the repository root, pinned to ``cpus``, in its own session.

    Its own session keeps a terminal's Ctrl-C away from it: the harness
    decides when it stops. ``death_signal`` reaches it if the harness dies.
    """
    proc = subprocess.Popen(
        list(argv),
        cwd=ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_preexec(cpus, death_signal),
    )
    _LIVE[proc.pid] = proc
    return proc


def stop(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; return the exit code.

    Descendants still running once it has exited are killed. A Ctrl-C while
    waiting kills the process at once before propagating.
    """
    family: set[tuple[int, int]] = set()
    try:
        if proc.poll() is not None:
            return proc.returncode
        family = descendants(proc.pid)
        try:
            proc.terminate()
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            family |= descendants(proc.pid)
            proc.kill()
            return proc.wait(5.0)
        except BaseException:
            family |= descendants(proc.pid)
            proc.kill()
            proc.wait(5.0)
            raise
    finally:
        _LIVE.pop(proc.pid, None)
        _kill_leftovers(family)


def stop_all() -> list[int]:
    """Kill every process started and not yet stopped, with its descendants; their pids.

    For an interrupted run: no grace period.
    """
    pids = []
    for pid, proc in list(_LIVE.items()):
        family = descendants(pid) if proc.poll() is None else set()
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
        _kill_leftovers(family)
        _LIVE.pop(pid, None)
        pids.append(pid)
    return pids


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
