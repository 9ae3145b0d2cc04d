"""The walls around a process sandbox: namespaces, a uid of its own, cgroups.

:mod:`._process_spawn` asks this module what the host offers
(:func:`host_support`, detected once per process), turns a template's
settings into a :class:`Plan` (:func:`make_plan`), and uses the pieces:
:func:`bwrap_argv` to wrap the agent's command, :class:`UidLease` for its
uid, :class:`SandboxCgroup` for its limits, pause and kill. Everything here
is blocking (file system, ``/proc``, one probe process at detection) and
runs in worker threads; nothing touches an event loop.

The walls, strongest first (docs/sandboxing.md has the whole picture):

1. **Namespaces** (bubblewrap, Debian package ``bubblewrap``): the agent
   runs in its own mount, PID, IPC, UTS, cgroup and (unless the template
   sets ``network: true``) network namespace. Its file system is built
   from nothing: read-only ``/usr`` (and the ``/bin``, ``/lib*`` links),
   a few ``/etc`` files (the loader cache, time zone, ``passwd``/``group``,
   TLS roots, ``hosts``; ``resolv.conf`` and the other resolver files only
   with the network on), the Python interpreter's prefixes, the runtime's
   import root and the folders it links to, a private ``/tmp`` and
   ``/dev/shm`` (tmpfs), ``/proc`` of its own PID namespace, a minimal
   ``/dev``, and its working directory (the template copy, read-write, at
   the same path as on the host, so that its socket, log and ``HOME`` mean
   the same on both sides). It cannot see the data directory, the keys
   file, other sandboxes or any other process. ``--die-with-parent`` ties
   the namespace to bwrap; the orchestrator ties bwrap to itself (see
   :mod:`._process_spawn`), so nothing outlives the orchestrator.
2. **A uid of its own** (the orchestrator must be root, and ``setpriv``
   from util-linux is needed): each sandbox leases a uid/gid from
   ``uid_range`` (default :data:`DEFAULT_UID_RANGE`), its working directory
   is chowned to it, and ``setpriv`` drops to it inside the namespaces
   with no supplementary groups, an empty capability bounding set and
   ``PR_SET_NO_NEW_PRIVS``; bwrap itself keeps only ``CAP_SETUID``,
   ``CAP_SETGID``, ``CAP_SETPCAP`` and ``CAP_DAC_OVERRIDE`` (to enter the
   0700 working directory) for that step. Leases are locked in
   ``/run/ppio-sandbox/uids`` so that two orchestrators on one host never
   hand out the same uid. Even a bind mount that leaked another sandbox's
   directory would show files of another uid, mode 0700.
3. **cgroups** (v2, or v1, per controller; the orchestrator's own cgroup
   must be writable): ``memory.max``/``memory.limit_in_bytes`` for
   ``memory_limit`` (the whole sandbox, all its processes; past it the
   kernel's OOM killer ends the sandbox), ``cpu.max``/``cpu.cfs_quota_us``
   for ``cpu_limit`` (fractions are a time-slice quota), ``pids.max`` for
   ``pids_limit`` (fork bombs), and the freezer for pause/resume. Each
   sandbox gets its own cgroup below the orchestrator's, created at launch
   (the child joins it before bwrap runs, so everything in the sandbox is
   in it) and removed at close once it is empty. Without cgroup v2's
   ``cgroup.kill``, close freezes the cgroup, SIGKILLs every process in it
   and thaws it, so that nothing forks past the kill.

Fallbacks (``isolation="auto"`` takes the strongest available and logs one
WARNING naming each missing wall and why; ``isolation="bwrap"`` refuses to
start without namespaces; ``isolation="none"`` is the behaviour before any
wall existed: the orchestrator's user, the whole file system, RLIMITs):

* no bwrap or it cannot create namespaces -> no namespaces and no uid of
  its own (without a private mount namespace the host paths would have to
  be opened up to the sandbox's uid);
* not root or no ``setpriv`` -> namespaces, but the orchestrator's uid
  (unprivileged bwrap in a user namespace, which also forbids nested user
  namespaces);
* no memory cgroup -> ``RLIMIT_AS`` (per process, address space);
* no cpu cgroup -> CPU affinity (``ceil(cpu_limit)`` cores);
* no pids cgroup -> ``RLIMIT_NPROC`` (per uid: only meaningful with a uid
  of its own);
* no freezer -> SIGSTOP/SIGCONT of the agent's process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "DEFAULT_PIDS_LIMIT",
    "DEFAULT_UID_RANGE",
    "LEVELS",
    "HostSupport",
    "IsolationUnavailable",
    "Level",
    "Plan",
    "SandboxCgroup",
    "UidLease",
    "agent_process",
    "bwrap_argv",
    "host_support",
    "make_plan",
    "processes_of",
]

logger = logging.getLogger("ppio_sandbox.orchestrator.sandbox")

Level = Literal["auto", "bwrap", "none"]
LEVELS: tuple[Level, ...] = ("auto", "bwrap", "none")

DEFAULT_UID_RANGE = (1_900_000_000, 65_536)
"""First uid and how many: far above the ids ``useradd`` hands out, including
subordinate ranges (100000 + 65536 n), and below 2**31."""
DEFAULT_PIDS_LIMIT = 512
"""Processes and threads per sandbox (``pids.max``): stops fork bombs."""
DEFAULT_TMP_SIZE = 1 << 30
"""Size of the private ``/tmp`` when the template sets no memory limit."""

UID_LOCK_DIR = Path("/run/ppio-sandbox/uids")
# What bwrap keeps until setpriv: changing ids and dropping the bounding set,
# and entering the workdir (0700, already the sandbox's) for --chdir.
_CAPS_FOR_SETPRIV = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_OVERRIDE")
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_ALWAYS = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/alternatives",
    "/etc/mime.types",
)
_ETC_NETWORK = (
    "/etc/resolv.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
)


class IsolationUnavailable(RuntimeError):
    """``isolation="bwrap"`` was asked for and the host cannot provide it."""


# --- what the host offers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """A cgroup hierarchy the orchestrator may create sandbox cgroups in."""

    version: Literal[1, 2]
    base: Path
    """The orchestrator's own cgroup in it: sandbox cgroups are its children."""


@dataclass(frozen=True)
class HostSupport:
    """Which walls this host can build; ``problems`` says why the others are missing."""

    bwrap: str | None = None
    setpriv: str | None = None
    root: bool = False
    memory: Hierarchy | None = None
    cpu: Hierarchy | None = None
    pids: Hierarchy | None = None
    freezer: Hierarchy | None = None
    problems: Mapping[str, str] = field(default_factory=dict)


_detected: HostSupport | None = None
_detect_lock = threading.Lock()


@dataclass(frozen=True)
class Tools:
    """The host programs a launch chains through (util-linux and a POSIX shell)."""

    setpriv: str | None
    prlimit: str | None
    taskset: str | None
    sh: str | None


@functools.cache
def host_tools() -> Tools:
    """Found once per process, on the orchestrator's PATH."""
    sh = "/bin/sh" if os.access("/bin/sh", os.X_OK) else None
    return Tools(shutil.which("setpriv"), shutil.which("prlimit"), shutil.which("taskset"), sh)


def host_support() -> HostSupport:
    """What this host offers, detected on first use (about 10 ms: one bwrap probe)."""
    global _detected
    with _detect_lock:
        if _detected is None:
            _detected = _detect()
        return _detected


def _detect() -> HostSupport:
    problems: dict[str, str] = {}
    root = os.geteuid() == 0
    if not sys.platform.startswith("linux"):
        why = f"namespaces and cgroups are Linux features (this is {sys.platform})"
        return HostSupport(problems={w: why for w in ("namespaces", "uid", *_CGROUP_WALLS)})
    bwrap = shutil.which("bwrap")
    setpriv = shutil.which("setpriv") if root else None
    if bwrap is None:
        problems["namespaces"] = "bubblewrap is not installed (apt-get install bubblewrap)"
    if not root:
        problems["uid"] = f"the orchestrator is not root (uid {os.geteuid()}), so it cannot switch"
    elif setpriv is None:
        problems["uid"] = "setpriv is not installed (apt-get install util-linux)"
    if bwrap is not None:
        why = _probe_bwrap(bwrap, setpriv if root else None)
        if why is not None:
            problems["namespaces"] = why
            bwrap = None
    if bwrap is None and "uid" not in problems:
        problems["uid"] = "it needs the namespaces (without them the host's paths would be open)"
    hierarchies = _cgroup_support(problems)
    return HostSupport(
        bwrap=bwrap,
        setpriv=setpriv if bwrap is not None else None,
        root=root,
        problems=problems,
        **hierarchies,
    )


def _probe_bwrap(bwrap: str, setpriv: str | None) -> str | None:
    """None if bwrap builds the namespaces we use here, else why not."""
    true = shutil.which("true") or "/bin/true"
    argv = [bwrap, *_namespace_args(network=False, as_root=setpriv is not None)]
    argv += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--"]
    if setpriv is not None:
        argv += _setpriv_args(setpriv, DEFAULT_UID_RANGE[0])
    argv.append(true)
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap could not run: {exc}"
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        return f"bwrap cannot create namespaces here: {said[-1] if said else done.returncode}"
    return None


# --- cgroups: detection -----------------------------------------------------------------------

_CGROUP_WALLS = ("memory", "cpu", "pids", "freezer")
_V2_FILES = {"memory": "memory.max", "cpu": "cpu.max", "pids": "pids.max"}
_probe_names = itertools.count()


def _cgroup_support(problems: dict[str, str]) -> dict[str, Hierarchy | None]:
    """For each wall, the hierarchy to use (v2 first, then v1); records why not."""
    try:
        v1, v2, notes = _cgroup_mounts()
    except OSError as exc:
        why = f"cannot read the cgroup mounts: {exc}"
        v1, v2, notes = {}, None, dict.fromkeys(_CGROUP_WALLS, why)
    found: dict[str, Hierarchy | None] = {}
    for wall in _CGROUP_WALLS:
        why = notes.get(wall, "")
        choice = None
        if v2 is not None:
            choice, why2 = _usable_v2(v2, wall)
            why = why or why2
        v1_name = "freezer" if wall == "freezer" else wall
        if choice is None and v1_name in v1:
            choice, why1 = _usable(Hierarchy(1, v1[v1_name]), wall)
            why = why1 or why
        if choice is None and not why:
            why = "no cgroup hierarchy offers it"
        if choice is None:
            problems[wall] = why
        found[wall] = choice
    _remove_stale(found.values())
    return found


def _cgroup_mounts() -> tuple[dict[str, Path], Path | None, dict[str, str]]:
    """Our own cgroup in each v1 controller hierarchy, and in the v2 one."""
    mounts: list[tuple[str, str, str, set[str]]] = []  # fstype, root, mountpoint, controllers
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        try:
            dash = fields.index("-")
        except ValueError:
            continue
        fstype = fields[dash + 1]
        if fstype in ("cgroup", "cgroup2"):
            opts = set(fields[dash + 3].split(",")) if len(fields) > dash + 3 else set()
            mounts.append((fstype, _unescape(fields[3]), _unescape(fields[4]), opts))
    v1: dict[str, Path] = {}
    v2: Path | None = None
    notes: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and not controllers:
            for fstype, root, point, _ in mounts:
                if fstype == "cgroup2" and (base := _join(point, root, path)) is not None:
                    v2 = base
                    break
            continue
        names = set(controllers.split(","))
        for fstype, root, point, opts in mounts:
            if fstype == "cgroup" and names <= opts:
                base = _join(point, root, path)
                if base is None:
                    continue
                for name in names:
                    v1[name] = base
                break
    return v1, v2, notes


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


def _join(point: str, root: str, path: str) -> Path | None:
    """Where ``path`` (relative to the hierarchy's root) is below a mount of ``root``."""
    if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
        return None
    rest = path[len(root) :] if root != "/" else path
    base = Path(point) / rest.lstrip("/")
    return base if base.is_dir() else None


def _usable_v2(base: Path, wall: str) -> tuple[Hierarchy | None, str]:
    if wall != "freezer":
        try:
            available = (base / "cgroup.controllers").read_text().split()
            enabled = (base / "cgroup.subtree_control").read_text().split()
        except OSError as exc:
            return None, f"cgroup v2 at {base}: {exc.strerror}"
        if wall not in available:
            return None, f"cgroup v2 at {base} does not offer the {wall} controller"
        if wall not in enabled:
            try:
                (base / "cgroup.subtree_control").write_text(f"+{wall}")
            except OSError as exc:
                return None, (
                    f"cgroup v2 at {base}: cannot delegate {wall} to child cgroups "
                    f"({exc.strerror}; run the orchestrator in a cgroup of its own, "
                    "e.g. systemd Delegate=yes)"
                )
    return _usable(Hierarchy(2, base), wall)


def _usable(hierarchy: Hierarchy, wall: str) -> tuple[Hierarchy | None, str]:
    """Create and remove a probe cgroup: the hierarchy is usable if that works."""
    probe = hierarchy.base / f"ppio-probe-{os.getpid()}-{next(_probe_names)}"
    try:
        probe.mkdir()
    except OSError as exc:
        why = f"cgroup v{hierarchy.version} at {hierarchy.base} is not writable ({exc.strerror})"
        return None, why
    try:
        need = (
            "cgroup.freeze"
            if hierarchy.version == 2 and wall == "freezer"
            else _V2_FILES.get(wall)
            if hierarchy.version == 2
            else None
        )
        if need is not None and not (probe / need).exists():
            return None, f"cgroup v{hierarchy.version} at {hierarchy.base} has no {need}"
        return hierarchy, ""
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


_OURS = re.compile(r"ppio-(?:sbx|probe)-(\d+)-\d+")


def _remove_stale(hierarchies: Iterable[Hierarchy | None]) -> None:
    """Remove empty sandbox cgroups left by orchestrators that died (best effort)."""
    for base in {h.base for h in hierarchies if h is not None}:
        with contextlib.suppress(OSError):
            for entry in base.iterdir():
                match = _OURS.fullmatch(entry.name)
                if match and not _pid_alive(int(match[1])):
                    with contextlib.suppress(OSError):
                        entry.rmdir()  # fails (EBUSY) while processes are in it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- the plan for one template ----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The walls one template's sandboxes get on this host."""

    level: Literal["bwrap", "none"]
    bwrap: str | None = None
    setpriv: str | None = None
    """Set when each sandbox gets a uid of its own."""
    network: bool = True
    """The sandbox shares the host's network (no network namespace)."""
    memory: Hierarchy | None = None
    cpu: Hierarchy | None = None
    pids: Hierarchy | None = None
    freezer: Hierarchy | None = None
    missing: tuple[str, ...] = ()
    """One line per wall that the template asked for and does not get, and why."""

    @property
    def uses_cgroups(self) -> bool:
        return any((self.memory, self.cpu, self.pids, self.freezer))

    def describe(self) -> dict[str, object]:
        """The walls, for a sandbox's API view."""
        cgroups = {
            name: f"v{h.version}"
            for name, h in (
                ("memory", self.memory),
                ("cpu", self.cpu),
                ("pids", self.pids),
                ("freezer", self.freezer),
            )
            if h is not None
        }
        return {
            "level": self.level,
            "namespaces": self.level == "bwrap",
            "own_uid": self.setpriv is not None,
            "network": self.network,
            "cgroups": cgroups,
        }


_warned: set[str] = set()
_warned_lock = threading.Lock()


def make_plan(
    isolation: Level,
    *,
    network: bool,
    bind: str,
    memory_limit: int | None,
    cpu_limit: float | None,
    pids_limit: int | None,
) -> Plan:
    """The walls for these settings (blocking on first use: host detection).

    Logs one WARNING per distinct set of missing walls (so once per
    template kind at start, not once per sandbox). Raises
    :class:`IsolationUnavailable` for ``isolation="bwrap"`` without bwrap.
    """
    if isolation == "none":
        return Plan(level="none", network=True)
    host = host_support()
    missing: list[str] = []
    if host.bwrap is None:
        if isolation == "bwrap":
            raise IsolationUnavailable(
                f"isolation='bwrap': {host.problems.get('namespaces', 'bwrap is unavailable')}"
            )
        missing.append(f"namespaces: {host.problems.get('namespaces')}")
    elif host.setpriv is None:
        missing.append(f"own uid: {host.problems.get('uid')}")
    shares_network = network or host.bwrap is None
    if not network and host.bwrap is not None and bind == "tcp":
        shares_network = True
        missing.append("network namespace: bind='tcp' needs the host's loopback")
    plan = Plan(
        level="bwrap" if host.bwrap is not None else "none",
        bwrap=host.bwrap,
        setpriv=host.setpriv,
        network=shares_network,
        memory=host.memory if memory_limit is not None else None,
        cpu=host.cpu if cpu_limit is not None else None,
        pids=host.pids if pids_limit is not None else None,
        freezer=host.freezer,
    )
    fallback = {
        "memory": "RLIMIT_AS per process",
        "cpu": "CPU affinity",
        "pids": "RLIMIT_NPROC per uid" if plan.setpriv else "no limit (RLIMIT_NPROC needs a uid)",
        "freezer": "SIGSTOP/SIGCONT",
    }
    wanted = {"memory": memory_limit, "cpu": cpu_limit, "pids": pids_limit, "freezer": True}
    for wall in _CGROUP_WALLS:
        if wanted[wall] is not None and getattr(host, wall) is None:
            missing.append(f"{wall} cgroup: {host.problems.get(wall)} -> {fallback[wall]}")
    if missing:
        plan = dataclasses.replace(plan, missing=tuple(missing))
        text = "; ".join(missing)
        with _warned_lock:
            first = text not in _warned
            _warned.add(text)
        if first:
            logger.warning("process sandboxes run without some walls: %s", text)
    return plan


# --- bubblewrap -------------------------------------------------------------------------------


def _namespace_args(*, network: bool, as_root: bool) -> list[str]:
    args = ["--die-with-parent", "--new-session"]
    args += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
    if not network:
        args.append("--unshare-net")
    if as_root:
        # No user namespace: as root it would map the sandbox to uid 0 outside.
        # setpriv needs these to drop to the sandbox's uid, then drops them all.
        args += ["--cap-drop", "ALL"]
        for cap in _CAPS_FOR_SETPRIV:
            args += ["--cap-add", cap]
    else:
        args += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    return args


def _setpriv_args(setpriv: str, uid: int) -> list[str]:
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


def bwrap_argv(
    plan: Plan,
    argv: Sequence[str],
    *,
    uid: int | None,
    workdir: Path,
    socket_dir: Path | None,
    read_only: tuple[Path, ...],
    private: tuple[Path, ...],
    tmp_size: int,
) -> list[str]:
    """``argv`` wrapped in bwrap (and setpriv when ``uid`` is given).

    ``read_only`` are bound read-only at their own paths (the interpreter,
    the import root and its targets, the template's extra paths);
    ``private`` are hidden behind an empty tmpfs should a read-only bind
    contain them (the data directory); ``workdir`` and ``socket_dir`` are
    bound read-write at their own paths.
    """
    base, made = _bwrap_base(plan, uid is not None, read_only, private, tmp_size)
    args, known = list(base), set(made)
    _bind(args, known, "--bind", workdir)
    if socket_dir is not None and not _under(socket_dir, workdir):
        _bind(args, known, "--bind", socket_dir)
    args += ["--chdir", str(workdir), "--"]
    if uid is not None:
        assert plan.setpriv is not None
        args += _setpriv_args(plan.setpriv, uid)
    return args + list(argv)


@functools.lru_cache(maxsize=64)
def _bwrap_base(
    plan: Plan,
    as_root: bool,
    read_only: tuple[Path, ...],
    private: tuple[Path, ...],
    tmp_size: int,
) -> tuple[tuple[str, ...], frozenset[Path]]:
    """Everything but the sandbox's own directories: the same for a template's sandboxes.

    Returns the arguments and the directories they create (see :func:`_bind`).
    """
    assert plan.bwrap is not None
    args = [plan.bwrap, *_namespace_args(network=plan.network, as_root=as_root)]
    args += ["--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in _SYSTEM_DIRS:
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    etc = _ETC_ALWAYS + (_ETC_NETWORK if plan.network else ())
    for name in etc:
        args += ["--ro-bind-try", name, name]
    wanted = _outermost(p for p in read_only if not _under(p, Path("/usr")))
    nested = sorted({Path(os.path.abspath(p)) for p in read_only if Path(p).exists()})
    # The private mounts first: a path below /tmp bound later stays visible.
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--perms", "01777", "--size", str(tmp_size), "--tmpfs", "/tmp"]
    args += ["--perms", "01777", "--size", str(tmp_size), "--tmpfs", "/dev/shm"]
    made: set[Path] = set()
    for path in wanted:
        _bind(args, made, "--ro-bind", path)
    masks = _outermost(p for p in private if any(_under(p, source) for source in wanted))
    for mask in masks:
        args += ["--tmpfs", str(mask)]
        made -= {d for d in made if _under(d, mask)}
        for inner in nested:  # the mask hid what was bound below it: bind those again
            if inner != mask and _under(inner, mask):
                _bind(args, made, "--ro-bind", inner)
    return tuple(args), frozenset(made)


def _bind(args: list[str], made: set[Path], how: str, path: Path) -> None:
    """Bind ``path`` at itself, after making its missing parents (``made``: done already).

    bwrap would make missing mount points' parents mode 0700, which the
    sandbox's uid could not enter: ``--dir`` makes them 0755 first.
    """
    for parent in reversed(path.parents):
        if parent != Path("/") and parent not in made:
            made.add(parent)
            args.extend(("--dir", str(parent)))
    args.extend((how, str(path), str(path)))


def _under(path: Path, parent: Path) -> bool:
    return path == parent or path.is_relative_to(parent)


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """The paths, without any that another one contains, in a stable order."""
    unique = sorted({Path(os.path.abspath(p)) for p in paths if Path(p).exists()})
    kept: list[Path] = []
    for path in unique:  # sorted: a parent comes before its children
        if path != Path("/") and not any(_under(path, k) for k in kept):
            kept.append(path)
    return kept


_python_dirs_cache: dict[str, tuple[Path, ...]] = {}


def python_dirs(python: str) -> tuple[Path, ...]:
    """The directories an interpreter needs: its venv, its real prefix, the venv's home."""
    cached = _python_dirs_cache.get(python)
    if cached is not None:
        return cached
    exe = Path(python if os.path.isabs(python) else (shutil.which(python) or python))
    dirs = {exe.parent.parent, exe.resolve().parent.parent}
    cfg = exe.parent.parent / "pyvenv.cfg"
    with contextlib.suppress(OSError):
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                home = Path(value.strip())
                dirs |= {home.parent, home.resolve().parent}
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        dirs |= {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    result = tuple(sorted(d for d in dirs if d != Path("/")))
    _python_dirs_cache[python] = result
    return result


# --- uids -------------------------------------------------------------------------------------


class UidLease:
    """One uid (= gid) from a range, held until :meth:`release`.

    Unique within this process (a set) and across processes on the host
    (an ``flock`` on ``/run/ppio-sandbox/uids/<uid>``, released by the
    kernel if the orchestrator dies).
    """

    _taken: set[int] = set()
    _lock = threading.Lock()
    _cursor: dict[tuple[int, int], int] = {}

    def __init__(self, uid: int, fd: int | None) -> None:
        self.uid = uid
        self._fd = fd

    @classmethod
    def acquire(cls, uid_range: tuple[int, int]) -> UidLease:
        """A free uid from ``(first, count)``; RuntimeError when all are taken."""
        first, count = uid_range
        lock_dir = _uid_lock_dir()
        with cls._lock:
            start = cls._cursor.get(uid_range, 0)
            for step in range(count):
                uid = first + (start + step) % count
                if uid in cls._taken:
                    continue
                fd = _lock_uid(lock_dir, uid)
                if fd == -1:
                    continue  # another orchestrator holds it
                cls._taken.add(uid)
                cls._cursor[uid_range] = (start + step + 1) % count
                return cls(uid, fd)
        raise RuntimeError(f"no free sandbox uid in {first}..{first + count - 1}")

    def release(self) -> None:
        """Give the uid back (only once every process of it is gone). Idempotent."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._taken.discard(self.uid)


_lock_dir_ready: Path | None = None


def _uid_lock_dir() -> Path | None:
    global _lock_dir_ready
    if _lock_dir_ready is None:
        try:
            UID_LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            _lock_dir_ready = UID_LOCK_DIR
        except OSError as exc:
            logger.warning("uid leases are not shared between orchestrators: %s", exc)
            return None
    return _lock_dir_ready


def _lock_uid(lock_dir: Path | None, uid: int) -> int | None:
    """A held lock fd for ``uid``, None without a lock dir, -1 if someone holds it."""
    if lock_dir is None:
        return None
    fd = os.open(lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def chown_tree(root: Path, uid: int) -> None:
    """Give ``root`` and everything below it to ``uid``:``uid`` (symlinks themselves)."""
    os.lchown(root, uid, uid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in itertools.chain(dirnames, filenames):
            os.lchown(os.path.join(dirpath, name), uid, uid)


# --- one sandbox's cgroup ---------------------------------------------------------------------

_sandbox_names = itertools.count()


class SandboxCgroup:
    """One sandbox's cgroup in each hierarchy its plan uses.

    Created before the spawn; the child writes its pid into every
    ``cgroup.procs`` (:attr:`procs_files`) before it runs bwrap, so bwrap
    and all it starts are inside from their first instruction.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.name = f"ppio-sbx-{os.getpid()}-{next(_sandbox_names)}"
        bases = {h.base: h for h in (plan.memory, plan.cpu, plan.pids, plan.freezer) if h}
        self.dirs = [base / self.name for base in bases]
        self._dir_of = {
            wall: h.base / self.name
            for wall, h in (
                ("memory", plan.memory),
                ("cpu", plan.cpu),
                ("pids", plan.pids),
                ("freezer", plan.freezer),
            )
            if h is not None
        }

    @property
    def procs_files(self) -> tuple[str, ...]:
        return tuple(str(d / "cgroup.procs") for d in self.dirs)

    def create(
        self, *, memory_limit: int | None, cpu_limit: float | None, pids_limit: int | None
    ) -> None:
        """Make the directories and write the limits (blocking); removes them on failure."""
        try:
            for directory in self.dirs:
                directory.mkdir()
            plan = self.plan
            if plan.memory is not None and memory_limit is not None:
                self._memory(plan.memory.version, memory_limit)
            if plan.cpu is not None and cpu_limit is not None:
                period = 100_000
                quota = max(1_000, round(cpu_limit * period))
                if plan.cpu.version == 2:
                    self._write("cpu", "cpu.max", f"{quota} {period}")
                else:
                    self._write("cpu", "cpu.cfs_period_us", str(period))
                    self._write("cpu", "cpu.cfs_quota_us", str(quota))
            if plan.pids is not None and pids_limit is not None:
                self._write("pids", "pids.max", str(pids_limit))
        except BaseException:
            self.remove(timeout=0)
            raise

    def _memory(self, version: int, limit: int) -> None:
        if version == 2:
            self._write("memory", "memory.max", str(limit))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                self._write("memory", "memory.swap.max", "0")
        else:
            self._write("memory", "memory.limit_in_bytes", str(limit))
            with contextlib.suppress(OSError):
                self._write("memory", "memory.memsw.limit_in_bytes", str(limit))

    def _write(self, wall: str, name: str, value: str) -> None:
        with open(self._dir_of[wall] / name, "w") as f:
            f.write(value)

    def _read(self, wall: str, name: str) -> str:
        try:
            return (self._dir_of[wall] / name).read_text()
        except (OSError, KeyError):
            return ""

    # facts

    def pids(self) -> list[int]:
        """Every process in the sandbox (all its cgroups hold the same ones)."""
        for directory in self.dirs:
            with contextlib.suppress(OSError):
                text = (directory / "cgroup.procs").read_text()
                return [int(x) for x in text.split()]
        return []

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this sandbox."""
        text = self._read("memory", "memory.events" if self._v2("memory") else "memory.oom_control")
        match = re.search(r"^oom_kill (\d+)", text, re.M)
        return int(match[1]) if match else 0

    def _v2(self, wall: str) -> bool:
        hierarchy = getattr(self.plan, wall)
        return hierarchy is not None and hierarchy.version == 2

    # actions

    def freeze(self, frozen: bool) -> None:
        """Freeze (pause) or thaw every process of the sandbox."""
        if self._v2("freezer"):
            self._write("freezer", "cgroup.freeze", "1" if frozen else "0")
        else:
            self._write("freezer", "freezer.state", "FROZEN" if frozen else "THAWED")

    def kill_all(self) -> None:
        """SIGKILL every process (``cgroup.kill`` on v2, else frozen then one by one)."""
        directory = self._dir_of.get("freezer") or (self.dirs[0] if self.dirs else None)
        if directory is None:
            return
        if self._v2("freezer") and (directory / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (directory / "cgroup.kill").write_text("1")
                return
        frozen = self.plan.freezer is not None
        if frozen:  # no fork can race the kills
            with contextlib.suppress(OSError):
                self.freeze(True)
        for _ in range(10):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if frozen:  # SIGKILL lands on a frozen task once it thaws
            with contextlib.suppress(OSError):
                self.freeze(False)

    def remove(self, timeout: float) -> bool:
        """Remove the directories once no process is left (polls up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        left = list(self.dirs)
        while True:
            for directory in list(left):
                try:
                    directory.rmdir()
                    left.remove(directory)
                except FileNotFoundError:
                    left.remove(directory)
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        logger.warning("cannot remove cgroup %s: %s", directory, exc)
                        left.remove(directory)
            if not left:
                return True
            if time.monotonic() >= deadline:
                logger.error("sandbox cgroup %s still has processes: %s", self.name, self.pids())
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


# --- processes --------------------------------------------------------------------------------


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # ``pid (comm) state ppid ...``: comm may hold spaces and parentheses.
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def processes_of(parents: set[int], candidates: Iterable[int] | None = None) -> list[int]:
    """Processes whose parent is in ``parents``, among ``candidates`` (default: all)."""
    if candidates is None:
        candidates = (int(e) for e in os.listdir("/proc") if e.isdigit())
    return [pid for pid in candidates if _parent_of(pid) in parents]


def agent_process(
    bwrap_pid: int, candidates: Sequence[int] | None = None
) -> tuple[int | None, int | None]:
    """``(namespace init, agent's process group)`` host ids below a bwrap process.

    bwrap forks the PID namespace's init, which starts a new session
    (``--new-session``) and forks the command (after setpriv, the agent)
    into it: the group holds init (which, as a namespace's init, ignores
    signals from outside but SIGKILL and SIGSTOP) and the agent with the
    processes it started. ``None`` for what does not exist (yet).
    """
    inits = processes_of({bwrap_pid}, candidates)
    if not inits:
        return None, None
    agents = processes_of(set(inits), candidates)
    for agent in agents:
        with contextlib.suppress(ProcessLookupError):
            return inits[0], os.getpgid(agent)
    return inits[0], None
