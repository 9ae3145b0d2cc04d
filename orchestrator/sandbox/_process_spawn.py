"""Starting and stopping a sandbox's OS process: the parts that are not HTTP.

Everything here is either pure (building argv and the environment) or
blocking file-system and process work that :mod:`.process` runs in anyio
worker threads. Nothing here touches an event loop.

What a sandbox process gets:

* its own working directory: a fresh *copy* of the template directory under
  ``work_root`` (mode 0700, also its ``HOME``), removed at close. A copy, not
  a symlinked view, because an agent may write into its directory and must
  never change the template or another session's files; templates are meant
  to be small (source files; dependencies live in the interpreter's
  environment), and the warm pool takes the copy off the session's critical
  path anyway.
* its own process group and session (``setsid``), so pause, resume and kill
  reach every process the agent started (unless it calls ``setsid`` itself).
* a scrubbed environment, see :func:`sandbox_environment`.
* resource limits, see :class:`ProcessSpec`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "RESERVED_ENV",
    "ProcessSpec",
    "describe_exit",
    "free_tcp_port",
    "prepare_workdir",
    "read_tail",
    "remove_paths",
    "sandbox_environment",
    "signal_group",
    "spawn",
]

BIND_ENV = "PPIO_AGENT_BIND"  # = ppio_sandbox.agent_runtime.config.BIND_ENV
SESSION_ENV = "PPIO_SESSION_ID"
UVICORN_OVERRIDE_ENV = "PPIO_OVERRIDE_UVICORN_BIND"
RESERVED_ENV = frozenset({BIND_ENV, SESSION_ENV, UVICORN_OVERRIDE_ENV})
"""Variables the sandbox sets itself; a template or session may not set them."""

LOG_NAME = "agent.log"
SOCKET_NAME = "agent.sock"
PRIVATE_DIR = ".ppio"  # inside the workdir: the log and (usually) the socket
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ProcessSpec:
    """Template-level settings shared by a provider and all its sandboxes.

    The process is ``python -m ppio_sandbox.agent_runtime <entrypoint>``
    unless ``command`` is given, which then wins (``entrypoint`` is ignored
    and need not exist). ``env`` is the template's environment.

    Limits enforced on the process (set between ``fork`` and ``exec``):

    * ``memory_limit`` (bytes) -> ``RLIMIT_AS``, soft = hard: the process's
      *virtual address space*. An allocation past it fails (Python raises
      ``MemoryError``; native code may abort). Virtual size is larger than
      RSS, so leave headroom (a bare runtime maps ~110 MiB). The sandbox
      also sets ``MALLOC_ARENA_MAX=2`` (unless the template sets it) so
      glibc's per-thread arenas do not reserve 64 MiB of address space each.
    * ``cpu_limit`` (cores) -> CPU affinity: the process may run on at most
      ``ceil(cpu_limit)`` CPUs at once, chosen round-robin from the
      orchestrator's own CPUs so sandboxes spread out. Fractions round up
      (0.5 -> one core); there is no time-slice quota (that needs cgroups'
      ``cpu.max``). ``RLIMIT_CPU`` was rejected: it is a cumulative CPU-
      seconds budget that would kill a long-lived session for past work.

    Neither is a security boundary: an agent running as the same (root)
    user can raise its own limits. Isolation proper is a container's job.
    """

    template_dir: Path
    work_root: Path
    entrypoint: str | None = None
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    memory_limit: int | None = None
    cpu_limit: float | None = None
    start_timeout: float = 20.0
    python: str = sys.executable
    bind: Literal["unix", "tcp"] = "unix"
    close_grace: float = 3.0

    def __post_init__(self) -> None:
        if self.entrypoint is None and self.command is None:
            raise ValueError("give an entrypoint (a file) or a command (argv)")
        if not self.template_dir.is_dir():
            raise FileNotFoundError(f"template directory not found: {self.template_dir}")
        if self.command is None and self.entrypoint is not None:
            entry = Path(self.entrypoint)
            if entry.is_absolute() or ".." in entry.parts:
                raise ValueError(f"entrypoint must be relative to the template: {entry}")
            if not (self.template_dir / entry).is_file():
                raise FileNotFoundError(f"entrypoint not found: {self.template_dir / entry}")
        if self.command is not None and not self.command:
            raise ValueError("command must not be empty")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise ValueError("memory_limit must be a positive number of bytes")
        if self.cpu_limit is not None and self.cpu_limit <= 0:
            raise ValueError("cpu_limit must be a positive number of cores")
        if self.start_timeout <= 0 or self.close_grace < 0:
            raise ValueError("start_timeout must be > 0 and close_grace >= 0")
        if self.bind not in ("unix", "tcp"):
            raise ValueError(f"bind must be 'unix' or 'tcp', not {self.bind!r}")
        check_env(self.env, "env")


def check_env(env: Mapping[str, str], what: str) -> None:
    """Reject names the sandbox owns and names or values ``execve`` cannot take."""
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(f"{what}: invalid environment variable name {name!r}")
        if name in RESERVED_ENV:
            raise ValueError(f"{what}: {name} is set by the sandbox")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"{what}: {name} must be a string without NUL bytes")


# --- environment ---------------------------------------------------------------------------

_import_roots: dict[Path, Path] = {}
_import_roots_lock = threading.Lock()


def sandbox_environment(
    spec: ProcessSpec,
    *,
    workdir: Path,
    bind: str,
    session_id: str | None,
    env_vars: Mapping[str, str],
) -> dict[str, str]:
    """The child's whole environment; nothing of the orchestrator's leaks in.

    ``PATH`` (the interpreter's directory first, so ``python`` in a command
    is the configured one), ``HOME`` = the workdir, ``LANG``/``LC_ALL``,
    ``PYTHONUNBUFFERED=1``, ``PYTHONPATH`` (see :func:`runtime_import_root`),
    ``PPIO_AGENT_BIND``, ``PPIO_SESSION_ID`` (absent for a warm process,
    which starts before its session exists), then the template's env and
    the session's ``env_vars``, later ones winning.
    """
    python_dir = str(Path(spec.python).parent)
    path = os.pathsep.join([python_dir, os.environ.get("PATH") or os.defpath])
    import_root = str(runtime_import_root(spec.work_root))
    env = {
        "PATH": path,
        "HOME": str(workdir),
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    if os.environ.get("LC_ALL"):
        env["LC_ALL"] = os.environ["LC_ALL"]
    if spec.memory_limit is not None:
        env["MALLOC_ARENA_MAX"] = "2"
    env.update(spec.env)
    env.update(env_vars)
    extra_path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = import_root + (os.pathsep + extra_path if extra_path else "")
    env[BIND_ENV] = bind
    if session_id is not None:
        env[SESSION_ENV] = session_id
    if spec.command is not None:
        env[UVICORN_OVERRIDE_ENV] = "1"
        if not bind.startswith("unix:"):
            env["PORT"] = bind.rpartition(":")[2]
    return env


def runtime_import_root(work_root: Path) -> Path:
    """A directory that makes ``ppio_sandbox.agent_runtime`` importable by path.

    The package is installed with setuptools' package-dir mapping; in an
    editable install the source folders are not named ``ppio_sandbox/...``,
    and only the installing interpreter's ``.pth`` import hook knows the
    mapping. So the sandbox gets ``<work_root>/.ppio-python/ppio_sandbox/``
    (a namespace portion) with symlinks to the installed ``agent_runtime``
    and ``client`` folders, found from their import specs. It works the same
    for editable and regular installs and for any interpreter that has the
    runtime's dependencies (msgspec, anyio, hypercorn). The orchestrator is
    deliberately not linked. The directory also holds a ``sitecustomize``
    that can redirect ``uvicorn.run`` (see :data:`SITECUSTOMIZE`).
    """
    with _import_roots_lock:
        root = _import_roots.get(work_root)
        if root is None or not root.is_dir():
            root = _import_roots[work_root] = _make_import_root(work_root)
        return root


def _make_import_root(work_root: Path) -> Path:
    root = work_root / ".ppio-python"
    package = root / "ppio_sandbox"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("agent_runtime", "client"):
        spec = importlib.util.find_spec(f"ppio_sandbox.{name}")
        if spec is None or not spec.submodule_search_locations:
            continue
        target = Path(next(iter(spec.submodule_search_locations))).resolve()
        link = package / name
        if not link.is_symlink() or Path(os.readlink(link)) != target:
            tmp = package / f".{name}.{os.getpid()}.{threading.get_ident()}"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(target, target_is_directory=True)
            os.replace(tmp, link)  # atomic: a starting sandbox never sees it missing
    site = root / "sitecustomize.py"
    if not site.is_file() or site.read_text() != SITECUSTOMIZE:
        tmp_site = root / f".sitecustomize.{os.getpid()}.{threading.get_ident()}"
        tmp_site.write_text(SITECUSTOMIZE)
        os.replace(tmp_site, site)
    return root


SITECUSTOMIZE = '''\
"""Written by ppio_sandbox's ProcessSandbox onto the sandbox's PYTHONPATH.

For command sandboxes (PPIO_OVERRIDE_UVICORN_BIND=1) it makes uvicorn.run()
listen on $PPIO_AGENT_BIND whatever host/port the agent passes: agents such
as bedrock-agentcore's BedrockAgentCoreApp call uvicorn.run(app, host=...,
port=8080) with no way to choose the address from outside. Then it runs
any sitecustomize this file shadows.
"""
import os as _os
import sys as _sys


def _ppio_patch_uvicorn(module):
    run = module.run
    bind = _os.environ["PPIO_AGENT_BIND"]

    def run_where_the_orchestrator_says(app, *args, **kwargs):
        for key in ("host", "port", "uds", "fd"):
            kwargs.pop(key, None)
        if bind.startswith("unix:"):
            kwargs["uds"] = bind[len("unix:"):]
        else:
            host, _, port = bind.rpartition(":")
            kwargs["host"], kwargs["port"] = host.strip("[]"), int(port)
        return run(app, *args, **kwargs)

    module.run = run_where_the_orchestrator_says


class _PPIOUvicornHook:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "uvicorn":
            return None
        _sys.meta_path.remove(cls)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _ppio_patch_uvicorn(module)

            spec.loader.exec_module = exec_and_patch
        return spec


# Popped so that programs the agent starts itself keep their own addresses.
if _os.environ.pop("PPIO_OVERRIDE_UVICORN_BIND", None) == "1" and _os.environ.get(
    "PPIO_AGENT_BIND"
):
    _sys.meta_path.insert(0, _PPIOUvicornHook)


def _ppio_chain():
    import importlib.machinery
    import importlib.util

    here = _os.path.dirname(_os.path.abspath(__file__))
    rest = [p for p in _sys.path if _os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin != __file__:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_ppio_chain()
'''


# --- working directory, socket, log ----------------------------------------------------------


def prepare_workdir(spec: ProcessSpec, label: str) -> tuple[Path, Path, Path | None]:
    """Copy the template into a fresh 0700 directory (blocking).

    Returns ``(workdir, socket_path, extra_dir)``: the socket lives in the
    workdir's private ``.ppio/`` unless that path is too long for a Unix
    socket, then in a fresh 0700 directory under the system temp dir
    (``extra_dir``, removed at close).
    """
    spec.work_root.mkdir(parents=True, exist_ok=True)
    runtime_import_root(spec.work_root)  # once per work_root; cached after
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:32] or "sandbox"
    workdir = Path(tempfile.mkdtemp(prefix=f"{safe}-", dir=spec.work_root))
    try:
        shutil.copytree(spec.template_dir, workdir, symlinks=True, dirs_exist_ok=True)
        workdir.chmod(0o700)
        private = workdir / PRIVATE_DIR
        private.mkdir(mode=0o700, exist_ok=True)
        sock = private / SOCKET_NAME
        extra: Path | None = None
        if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
            base = tempfile.gettempdir()
            if len(base) > 60:
                base = "/tmp"
            extra = Path(tempfile.mkdtemp(prefix="ppio-", dir=base))
            sock = extra / SOCKET_NAME
        return workdir, sock, extra
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def free_tcp_port() -> int:
    """A loopback port free right now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_tail(path: Path, size: int = 4096) -> str:
    """The last ``size`` bytes of the log (blocking); empty if there is none."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def remove_paths(*paths: Path | None) -> None:
    """Delete directories or files, ignoring what is already gone (blocking)."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


# --- the process -----------------------------------------------------------------------------

_cpu_cursor = itertools.count()


def _choose_cpus(cpu_limit: float | None) -> list[int] | None:
    if cpu_limit is None:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    want = math.ceil(cpu_limit)
    if want >= len(allowed):
        return None
    start = next(_cpu_cursor) * want
    return [allowed[(start + i) % len(allowed)] for i in range(want)]


def _limits_preexec(memory_limit: int | None, cpus: list[int] | None) -> Callable[[], None] | None:
    if memory_limit is None and cpus is None:
        return None

    def apply_limits() -> None:  # runs in the child between fork and exec
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return apply_limits


def spawn(
    spec: ProcessSpec, argv: list[str], env: dict[str, str], workdir: Path
) -> subprocess.Popen[bytes]:
    """Start the process (blocking: fork + exec): own session, limits, log file.

    ``subprocess.Popen`` rather than ``anyio.open_process`` because the
    limits need ``preexec_fn``, which anyio does not take. The preexec
    function only calls ``setrlimit``/``sched_setaffinity`` (no locks, no
    imports), which is what makes it safe in a threaded parent.
    """
    log_path = workdir / PRIVATE_DIR / LOG_NAME
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
            preexec_fn=_limits_preexec(spec.memory_limit, _choose_cpus(spec.cpu_limit)),
        )


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group; a group that is gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def describe_exit(returncode: int | None) -> str:
    """``"was killed by SIGKILL"``, ``"exited with code 1"``, ``"is still running"``."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"
