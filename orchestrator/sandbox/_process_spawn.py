"""Starting and stopping a sandbox's OS process: the parts that are not HTTP.

Everything here is either pure (building argv and the environment) or
blocking file-system and process work that :mod:`.process` runs in worker
threads. Nothing here touches an event loop.

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
* the walls of :mod:`._isolation` (namespaces, a uid of its own, cgroups)
  or, where the host lacks them, resource limits, see :class:`ProcessSpec`.

No orphans: every sandbox process is forked by one long-lived thread
(:func:`spawn`) and gets the parent-death signal SIGKILL before its program
runs (``setpriv --pdeathsig``, then a shell that gives up if the
orchestrator is already gone; see :func:`_exec_chain`). The kernel sends
that signal when the *thread* that forked dies, which is why anyio's
worker threads (they exit when idle) cannot do the forking; this thread
lives as long as the orchestrator. So when the orchestrator dies, even by
SIGKILL, its sandboxes die with it: bwrap by the signal, the namespace with
bwrap (``--die-with-parent``), or the agent itself without bwrap.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import importlib.util
import itertools
import logging
import math
import os
import queue
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
from typing import Any, Literal, TypeVar

from ppio_sandbox.agent_runtime.server import pick_server

from . import _isolation
from ._isolation import DEFAULT_PIDS_LIMIT, DEFAULT_UID_RANGE, LEVELS, Level

__all__ = [
    "RESERVED_ENV",
    "Launch",
    "ProcessSpec",
    "describe_exit",
    "free_tcp_port",
    "prepare_launch",
    "prepare_workdir",
    "read_tail",
    "release_launch",
    "remove_paths",
    "sandbox_environment",
    "scrub_paths",
    "signal_group",
    "spawn",
]

logger = logging.getLogger("ppio_sandbox.orchestrator.sandbox")

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
    (``--server`` hypercorn, uvicorn or auto: see :func:`resolve_server`)
    unless ``command`` is given, which then wins (``entrypoint`` is ignored
    and need not exist). ``env`` is the template's environment.

    ``isolation`` picks the walls (:mod:`._isolation`): ``"auto"`` (the
    default) builds every wall the host offers and logs a WARNING naming
    the missing ones; ``"bwrap"`` refuses to start without namespaces;
    ``"none"`` builds none (the orchestrator's user, the whole file system;
    only the RLIMIT/affinity limits below). ``network`` gives the sandbox
    the host's network (off: a network namespace with only loopback).
    ``read_only_paths`` are extra host paths the agent may read (bound at
    their own paths). ``uid_range`` = ``(first, count)`` of the uids leased
    to sandboxes.

    Limits, each through a cgroup where the host has one (for the whole
    sandbox, all its processes), else the fallback (set between ``fork``
    and ``exec``):

    * ``memory_limit`` (bytes): ``memory.max`` (v2) / ``memory.limit_in_bytes``
      (v1); an allocation past it gets the sandbox OOM-killed (the turn
      fails with SandboxCrashedError saying so). Fallback ``RLIMIT_AS``,
      soft = hard, per process: the *virtual address space*, where an
      allocation past it fails (Python raises ``MemoryError``; native code
      may abort); virtual size is larger than RSS, so leave headroom (a bare
      runtime maps ~110 MiB). Either way the sandbox also gets
      ``MALLOC_ARENA_MAX=2`` (unless the template sets it) so glibc's
      per-thread arenas do not reserve 64 MiB of address space each.
    * ``cpu_limit`` (cores): ``cpu.max`` / ``cpu.cfs_quota_us``, a time-slice
      quota, so fractions count (0.5 = half a core). Fallback CPU affinity:
      at most ``ceil(cpu_limit)`` CPUs, chosen round-robin from the
      orchestrator's own CPUs so sandboxes spread out. ``RLIMIT_CPU`` was
      rejected: it is a cumulative CPU-seconds budget that would kill a
      long-lived session for past work.
    * ``pids_limit`` (processes and threads, default 512): ``pids.max``, so a
      fork bomb stops at the limit. Fallback ``RLIMIT_NPROC``, which counts
      per uid and so means something only with a uid of its own.

    Only with a uid of its own are these limits out of the agent's reach
    (as root it could raise its RLIMITs; cgroup files are not even visible
    in its mount namespace).
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
    isolation: Level = "auto"
    network: bool = False
    pids_limit: int | None = DEFAULT_PIDS_LIMIT
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    read_only_paths: tuple[Path, ...] = ()
    server: Literal["hypercorn", "uvicorn", "auto"] = "hypercorn"

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
        if self.pids_limit is not None and self.pids_limit <= 0:
            raise ValueError("pids_limit must be a positive number of processes")
        if self.start_timeout <= 0 or self.close_grace < 0:
            raise ValueError("start_timeout must be > 0 and close_grace >= 0")
        if self.bind not in ("unix", "tcp"):
            raise ValueError(f"bind must be 'unix' or 'tcp', not {self.bind!r}")
        if self.server not in ("hypercorn", "uvicorn", "auto"):
            raise ValueError(
                f"server must be 'hypercorn', 'uvicorn' or 'auto', not {self.server!r}"
            )
        if self.isolation not in LEVELS:
            raise ValueError(
                f"isolation must be one of {', '.join(LEVELS)}, not {self.isolation!r}"
            )
        first, count = self.uid_range
        if not (first > 0 and count > 0 and first + count <= 2**31):
            raise ValueError(
                f"uid_range must be (first > 0, count > 0) below 2**31: {first, count}"
            )
        for path in self.read_only_paths:
            if not path.is_absolute():
                raise ValueError(f"read_only_paths must be absolute: {path}")
        check_env(self.env, "env")


def resolve_server(
    choice: str, python: str = sys.executable
) -> Literal["hypercorn", "uvicorn", "auto"]:
    """The ``--server`` the runtime in a sandbox is started with.

    ``"auto"`` stays ``"auto"`` when this interpreter, which the sandbox runs
    too, has uvicorn and httptools: the runtime then picks uvicorn unless the
    agent's app runs on trio (``python -m ppio_sandbox.agent_runtime --server
    auto``). The orchestrator is a sandbox's only client, and uvicorn answers
    it for about a third of hypercorn's CPU per request (benchmarks/RESULTS.md,
    orchestrator-process). Without them, or for a sandbox on another
    interpreter, it is hypercorn, the runtime's default.
    """
    if choice == "hypercorn":
        return "hypercorn"
    if choice == "uvicorn":
        return "uvicorn"
    if choice != "auto":
        raise ValueError(f"sandbox server must be auto, hypercorn or uvicorn, not {choice!r}")
    if python != sys.executable or pick_server("asyncio") != "uvicorn":
        return "hypercorn"
    return "auto"


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


@dataclass
class Launch:
    """What one sandbox holds on the host until :func:`release_launch`."""

    plan: _isolation.Plan
    workdir: Path
    socket: Path
    extra_dir: Path | None
    log_fd: int
    """Open on ``.ppio/agent.log`` since before the agent ran: tails are read
    through it, so an agent that swaps the file for a symlink shows nothing."""
    uid: _isolation.UidLease | None = None
    cgroup: _isolation.SandboxCgroup | None = None


def prepare_launch(spec: ProcessSpec, label: str) -> Launch:
    """Plan the walls, copy the template, lease a uid, create the cgroup (blocking).

    Raises :class:`._isolation.IsolationUnavailable` for ``isolation="bwrap"``
    on a host without bwrap; undoes its own work on any failure.
    """
    plan = _isolation.make_plan(
        spec.isolation,
        network=spec.network,
        bind=spec.bind,
        memory_limit=spec.memory_limit,
        cpu_limit=spec.cpu_limit,
        pids_limit=spec.pids_limit,
    )
    workdir, sock, extra = prepare_workdir(spec, label)
    launch: Launch | None = None
    try:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        log_fd = os.open(workdir / PRIVATE_DIR / LOG_NAME, flags, 0o600)
        launch = Launch(plan, workdir, sock, extra, log_fd)
        if plan.setpriv is not None:
            launch.uid = _isolation.UidLease.acquire(spec.uid_range)
            for path in (workdir, extra):
                if path is not None:
                    _isolation.chown_tree(path, launch.uid.uid)
        if plan.uses_cgroups:
            cgroup = _isolation.SandboxCgroup(plan)
            cgroup.create(
                memory_limit=spec.memory_limit,
                cpu_limit=spec.cpu_limit,
                pids_limit=spec.pids_limit,
            )
            launch.cgroup = cgroup
        return launch
    except BaseException:
        if launch is not None:
            release_launch(launch, 0.0)
        else:
            remove_paths(workdir, extra)
        raise


def release_launch(launch: Launch, timeout: float) -> None:
    """Give back what :func:`prepare_launch` took (blocking; the processes are dead).

    Waits up to ``timeout`` for the sandbox's cgroup to empty (its last
    processes may still be exiting) before removing it; the uid is only
    released once no process can hold it any more.
    """
    with contextlib.suppress(OSError):
        os.close(launch.log_fd)
    empty = launch.cgroup.remove(timeout) if launch.cgroup is not None else True
    if launch.uid is not None:
        if empty:
            launch.uid.release()
        else:
            logger.error("not releasing uid %s: its cgroup still has processes", launch.uid.uid)
    remove_paths(launch.workdir, launch.extra_dir, launch.socket)


def free_tcp_port() -> int:
    """A loopback port free right now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_tail(fd: int, size: int = 4096) -> str:
    """The last ``size`` bytes of the log open on ``fd`` (blocking); empty if none."""
    try:
        end = os.fstat(fd).st_size
        data = os.pread(fd, min(size, end), max(0, end - size))
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def scrub_paths(text: str, replacements: Mapping[Path | None, str]) -> str:
    """``text`` with each host path replaced by its placeholder, longest first."""
    pairs = sorted(
        ((str(path), name) for path, name in replacements.items() if path is not None),
        key=lambda pair: -len(pair[0]),
    )
    for path, name in pairs:
        text = text.replace(path, name)
    return text


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
_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
except (OSError, AttributeError):  # not Linux
    _prctl = None

# Run by /bin/sh between setpriv (which set the parent-death signal) and the
# sandbox's program: give up if the orchestrator died before that (the child
# was re-parented), join the sandbox's cgroups, exec the rest.
_JOIN = (
    '[ "$PPID" = "$1" ] || exit 97; shift; '
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 98; shift; done; shift; exec "$@"'
)


def _choose_cpus(cpu_limit: float | None) -> list[int] | None:
    if cpu_limit is None:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    want = math.ceil(cpu_limit)
    if want >= len(allowed):
        return None
    start = next(_cpu_cursor) * want
    return [allowed[(start + i) % len(allowed)] for i in range(want)]


@dataclass(frozen=True)
class _ChildSetup:
    """What the child needs between ``fork`` and the program: tie, join, limit."""

    parent: int
    procs_files: tuple[str, ...]
    rlimits: tuple[tuple[str, int], ...]  # (prlimit's name, value), soft = hard
    cpus: tuple[int, ...] | None


def _child_setup(spec: ProcessSpec, launch: Launch) -> _ChildSetup:
    plan = launch.plan
    rlimits: list[tuple[str, int]] = []
    if spec.memory_limit is not None and plan.memory is None:
        rlimits.append(("as", spec.memory_limit))
    if spec.pids_limit is not None and plan.pids is None and launch.uid is not None:
        rlimits.append(("nproc", spec.pids_limit))
    cpus = _choose_cpus(spec.cpu_limit) if plan.cpu is None else None
    return _ChildSetup(
        parent=os.getpid(),
        procs_files=launch.cgroup.procs_files if launch.cgroup is not None else (),
        rlimits=tuple(rlimits),
        cpus=tuple(cpus) if cpus is not None else None,
    )


def _exec_chain(setup: _ChildSetup) -> list[str] | None:
    """The programs that do ``setup`` before the sandbox's own (util-linux, /bin/sh).

    Doing it by exec keeps ``preexec_fn`` out of Popen, so that Python can
    ``vfork``: a ``fork`` copies the orchestrator's page tables, 10+ ms for
    a big orchestrator, on every sandbox launch. None when a tool is missing.
    """
    tools = _isolation.host_tools()
    if tools.setpriv is None or tools.sh is None:
        return None
    chain = [tools.setpriv, "--pdeathsig=KILL", "--", tools.sh, "-c", _JOIN, "ppio-sandbox"]
    chain += [str(setup.parent), *setup.procs_files, "--"]
    if setup.rlimits:
        if tools.prlimit is None:
            return None
        chain += [tools.prlimit, *(f"--{name}={v}:{v}" for name, v in setup.rlimits), "--"]
    if setup.cpus is not None:
        if tools.taskset is None:
            return None
        chain += [tools.taskset, "-c", ",".join(map(str, setup.cpus))]
    return chain


def _preexec(setup: _ChildSetup) -> Callable[[], None]:
    """The same set-up as :func:`_exec_chain`, in Python, for hosts without the tools.

    Only syscalls on values computed in the parent (no imports, no locks),
    which is what makes it safe in a threaded parent.
    """
    prctl = _prctl
    kill = int(signal.SIGKILL)
    limits = [
        (resource.RLIMIT_AS if name == "as" else resource.RLIMIT_NPROC, (value, value))
        for name, value in setup.rlimits
    ]

    def run_in_child() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, kill, 0, 0, 0)
            if os.getppid() != setup.parent:  # the orchestrator died before the prctl
                os._exit(1)
        pid = str(os.getpid()).encode()
        for path in setup.procs_files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        for which, value in limits:
            resource.setrlimit(which, value)
        if setup.cpus is not None:
            os.sched_setaffinity(0, setup.cpus)

    return run_in_child


def command_argv(spec: ProcessSpec, launch: Launch, argv: list[str]) -> list[str]:
    """``argv`` as executed: inside bwrap (and setpriv) when the plan says so."""
    if launch.plan.level != "bwrap":
        return argv
    return _isolation.bwrap_argv(
        launch.plan,
        argv,
        uid=launch.uid.uid if launch.uid is not None else None,
        workdir=launch.workdir,
        socket_dir=launch.socket.parent,
        read_only=_read_only(spec.work_root, spec.python, spec.read_only_paths),
        private=(spec.work_root.parent, spec.work_root),
        tmp_size=spec.memory_limit or _isolation.DEFAULT_TMP_SIZE,
    )


@functools.lru_cache(maxsize=64)
def _read_only(work_root: Path, python: str, extra: tuple[Path, ...]) -> tuple[Path, ...]:
    """What a sandbox may read besides the system: the import root and what it links to,
    the interpreter's prefixes, the template's extra paths."""
    import_root = runtime_import_root(work_root)
    package = import_root / "ppio_sandbox"
    read_only = [import_root, *extra, *_isolation.python_dirs(python)]
    for link in (package / "agent_runtime", package / "client"):
        if link.is_symlink():
            read_only.append(link.resolve())
    return tuple(read_only)


def spawn(
    spec: ProcessSpec, launch: Launch, argv: list[str], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start the process (blocking: vfork + exec): own session, walls, limits, log.

    The fork happens in the spawner thread (see the module docstring); the
    set-up between fork and the program is an exec chain (:func:`_exec_chain`)
    or, on hosts without util-linux, ``preexec_fn``. So Popen returns once
    the first program runs, and a program that is missing is reported here.
    """
    program = argv[0]
    if "/" in program and not os.path.isabs(program):
        program = str(launch.workdir / program)
    if shutil.which(program, path=env.get("PATH")) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    setup = _child_setup(spec, launch)
    chain = _exec_chain(setup)
    full = (chain or []) + command_argv(spec, launch, argv)
    preexec = _preexec(setup) if chain is None else None
    return _spawner.run(
        lambda: subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=launch.log_fd,
            stderr=subprocess.STDOUT,
            cwd=launch.workdir,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,
        )
    )


_T = TypeVar("_T")


class _Spawner:
    """One daemon thread, started on first use, that never exits: it does every fork."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]]]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, job: Callable[[], _T]) -> _T:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="ppio-sandbox-spawner", daemon=True
                )
                self._thread.start()
        self._jobs.put((future, job))
        return future.result()

    def _serve(self) -> None:
        while True:
            future, job = self._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)


_spawner = _Spawner()


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group; a group that is gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def describe_exit(returncode: int | None, *, wrapped: bool = False) -> str:
    """``"was killed by SIGKILL"``, ``"exited with code 1"``, ``"is still running"``.

    ``wrapped``: the process is bwrap, which exits with 128 + n when the
    agent was killed by signal n.
    """
    if returncode is None:
        return "is still running"
    if wrapped and 128 < returncode < 128 + 65:
        returncode = 128 - returncode
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"
