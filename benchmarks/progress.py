"""Where a run stands: step i of n, what it measures, time spent, time left.

On a terminal, one status line at the bottom is redrawn every second (bar,
step, label, elapsed, ETA) and each finished step is printed above it::

    [ 7/38] orchestrator-rps asyncio orchestrator c=16 rep 1 ... 4726 req/s (3.1 s)
    [ 8/38] ######----------- orchestrator-rps trio baseline c=1 rep 1 | 0:42, ETA 1:20

Elsewhere (CI logs, a pipe) there is no redrawing: one plain line per step,
begun when the step starts and ended with its result::

    [8/38 0:42 ETA 1:20] orchestrator-rps trio baseline c=1 rep 1 ... 2923 req/s (3.0 s)

The ETA comes from the planned steps: the steps left in the current
scenario at that scenario's mean step time so far, the steps of the
scenarios after it at the run's mean.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

__all__ = ["Progress", "format_seconds"]

_BAR = 16


def format_seconds(seconds: float) -> str:
    """``0:42``, ``12:05``, ``1:02:03``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of a run of ``total`` planned steps, written to ``stream`` (stderr).

    Scenarios call :meth:`start` before each step and :meth:`finish` with
    its result; the harness calls :meth:`begin` before each scenario (for a
    better ETA) and :meth:`close` at the end. ``tty``: redraw a status line
    (default: whether ``stream`` is a terminal).
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        refresh: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.index = 0
        self.stream = stream or sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self._clock = clock
        self._started = clock()
        self._step_started: float | None = None
        self._label = ""
        self._durations: list[float] = []
        self._scenario: str | None = None
        self._scenario_durations: list[float] = []
        self._scenario_left = 0
        self._lock = threading.Lock()
        self._status_shown = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.tty:
            self._ticker = threading.Thread(
                target=self._tick, args=(refresh,), name="progress", daemon=True
            )
            self._ticker.start()

    # --- what scenarios call ------------------------------------------------------------

    def begin(self, scenario: str, steps: int) -> None:
        """A scenario of ``steps`` planned steps starts (optional; sharpens the ETA)."""
        with self._lock:
            self._scenario = scenario
            self._scenario_durations = []
            self._scenario_left = steps

    def start(self, label: str) -> None:
        """Announce the next step."""
        with self._lock:
            self.index += 1
            self.total = max(self.total, self.index)
            self._label = label
            self._step_started = self._clock()
            if self.tty:
                self._draw_status()
            else:
                self._write(f"[{self.index}/{self.total} {self._times()}] {label} ... ")

    def finish(self, text: str) -> None:
        """End the current step with its result."""
        with self._lock:
            took = None
            if self._step_started is not None:
                took = self._clock() - self._step_started
                self._durations.append(took)
                self._scenario_durations.append(took)
                self._scenario_left = max(0, self._scenario_left - 1)
            self._step_started = None
            suffix = "" if took is None else f" ({took:.1f} s)"
            if self.tty:
                self._clear_status()
                self._write(f"[{self.index}/{self.total}] {self._label} ... {text}{suffix}\n")
                self._draw_status()
            else:
                self._write(f"{text}{suffix}\n")

    def note(self, text: str) -> None:
        """A line of its own."""
        with self._lock:
            if self.tty:
                self._clear_status()
                self._write(text + "\n")
                self._draw_status()
            else:
                self._write(text + "\n")

    def close(self, text: str | None = None) -> None:
        """Stop redrawing and clear the status line; then print ``text``, if any."""
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(timeout=2.0)
        with self._lock:
            if self.tty:
                self._clear_status()
            elif self._step_started is not None:
                self._write("\n")  # a started step's line, never finished
                self._step_started = None
            if text:
                self._write(text + "\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- estimates -----------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return self._clock() - self._started

    def eta(self) -> float | None:
        """Seconds left by the plan (``None`` until a step has finished)."""
        if not self._durations:
            return None
        overall = sum(self._durations) / len(self._durations)
        current = (
            sum(self._scenario_durations) / len(self._scenario_durations)
            if self._scenario_durations
            else overall
        )
        done = len(self._durations)
        in_scenario = min(self._scenario_left, self.total - done)
        later = max(0, self.total - done - in_scenario)
        left = in_scenario * current + later * overall
        if self._step_started is not None:  # the running step is part of in_scenario
            left -= min(self._clock() - self._step_started, current)
        return max(0.0, left)

    def _times(self) -> str:
        eta = self.eta()
        return f"{format_seconds(self.elapsed)} ETA {'?' if eta is None else format_seconds(eta)}"

    # --- terminal drawing (called with the lock held) -------------------------------------

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stream must not stop a run

    def _status(self) -> str:
        done = len(self._durations)
        filled = round(_BAR * done / self.total) if self.total else _BAR
        bar = "#" * filled + "-" * (_BAR - filled)
        width = len(str(self.total))
        label = self._label if self._step_started is not None else "..."
        line = f"[{self.index:>{width}}/{self.total}] {bar} {label} | {self._times()}"
        columns = shutil.get_terminal_size((100, 20)).columns
        return line if len(line) < columns else line[: max(10, columns - 2)] + "…"

    def _draw_status(self) -> None:
        self._write("\r\x1b[K" + self._status())
        self._status_shown = True

    def _clear_status(self) -> None:
        if self._status_shown:
            self._write("\r\x1b[K")
            self._status_shown = False

    def _tick(self, refresh: float) -> None:
        while not self._stop.wait(refresh):
            with self._lock:
                if self._status_shown:
                    self._draw_status()
