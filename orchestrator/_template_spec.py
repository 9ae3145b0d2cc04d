"""The ``.ppio-agent.yaml`` spec: its Structs and their validation.

Split from :mod:`.templates` (which re-exports every public name here): this
module parses and validates, the other stores. Nothing here executes code
or touches the network; every problem raises ``ValidationError`` whose
message starts with the field's path.

The text is hostile: it is parsed by
:func:`~ppio_sandbox.agent_runtime.packaging.load_agent_yaml` (no anchors or
aliases, bounded size and nesting), numbers must fall in sane ranges, values
quoted in messages are cut short, and the agent file and entrypoint are
resolved with a bounded number of symlinks (a loop is refused by name).
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import stat
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NoReturn

import msgspec

from ppio_sandbox.agent_runtime.errors import ValidationError
from ppio_sandbox.agent_runtime.packaging import (
    _SYMLINK_LOOP,
    AGENT_FILE,
    MAX_AGENT_FILE_BYTES,
    _inside,
    _resolve,
    load_agent_yaml,
)

__all__ = [
    "AgentSpec",
    "RuntimeSpec",
    "SandboxSpec",
    "load_agent_spec",
    "parse_agent_yaml",
    "parse_cpu",
    "parse_size",
    "template_id_for",
]

_MAX_YAML_BYTES = MAX_AGENT_FILE_BYTES
#: ``spec.runtime.timeout`` is at most a day (seconds).
MAX_TIMEOUT = 24 * 3600.0
#: ``spec.sandbox.warm_pool`` is at most this many processes.
MAX_WARM_POOL = 100
#: ``spec.runtime.memory_limit`` is at most 1 TiB.
MAX_MEMORY = 1024**4
#: ``spec.runtime.cpu_limit`` is at most this many cores.
MAX_CPU = 1024.0
_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?")
_ID_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Digits are bounded: a size of 200,000 digits must not cost a bignum conversion.
_SIZE_RE = re.compile(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([KMGTPE]i|[kKMGTPE])?\s*")
_CPU_RE = re.compile(r"\s*(\d{1,30}(?:\.\d{1,30})?)(m?)\s*")
_SIZE_UNITS = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_SIZE_UNITS |= {"E": 10**18, **{f"{u}i": 1024 ** (i + 1) for i, u in enumerate("KMGTPE")}}


class RuntimeSpec(msgspec.Struct, frozen=True, kw_only=True):
    """``spec.runtime``: the turn timeout (s), memory (bytes) and CPU (cores) limits."""

    timeout: float = 300.0
    memory_limit: int | None = None
    cpu_limit: float | None = None


class SandboxSpec(msgspec.Struct, frozen=True, kw_only=True):
    """``spec.sandbox``: which sandbox kind runs the agent, and how.

    ``command``, ``warm_pool``, ``env`` and ``network`` apply to ``process``
    sandboxes only. ``network``: the agent may use the host's network; off
    (the default), it has only a loopback of its own (docs/sandboxing.md).
    """

    kind: Literal["inprocess", "process"] = "inprocess"
    command: list[str] | None = None
    warm_pool: int = 0
    env: dict[str, str] = msgspec.field(default_factory=dict)
    template_id: str | None = None
    network: bool = False


class AgentSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A validated ``.ppio-agent.yaml``: metadata plus the agent's spec."""

    name: str
    version: str = "0.0.0"
    author: str = ""
    description: str = ""
    entrypoint: str
    runtime: RuntimeSpec = RuntimeSpec()
    sandbox: SandboxSpec = SandboxSpec()


# -- parsing ------------------------------------------------------------------


def _fail(path: str, problem: str) -> NoReturn:
    raise ValidationError(f"{path}: {problem}", details={"field": path})


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 80, 80, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 8


def _show(value: object) -> str:
    """``repr(value)`` cut short: messages quote what they refuse, but not 200 KB of it."""
    return _SHORT.repr(value)


def _key(key: object) -> str:
    """A mapping key as part of a field path: quoted if long, odd or not a string."""
    plain = isinstance(key, str) and len(key) <= 64 and key.isprintable()
    return key if plain else _show(key)  # type: ignore[return-value]


def _kind(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    names |= {int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _mapping(value: object, path: str, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(path, f"must be a mapping, got {_kind(value)}")
    for key in value:
        if key not in allowed:
            field = _key(key) if path == AGENT_FILE else f"{path}.{_key(key)}"
            _fail(field, f"unknown field; expected one of {', '.join(sorted(allowed))}")
    return value


def _text(value: object, path: str, *, default: str | None = None, max_len: int = 256) -> str:
    if value is None and default is not None:
        return default
    if value is None:
        _fail(path, "required")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        hint = ' (quote it, e.g. "1.10")' if isinstance(value, float) else ""
        _fail(path, f"must be a string, got {_kind(value)}{hint}")
    if len(value) > max_len or "\x00" in value:
        _fail(path, f"must be at most {max_len} characters, without NUL bytes")
    return value


def _slug(value: object, path: str, pattern: re.Pattern[str], max_len: int, what: str) -> str:
    text = _text(value, path)
    if not pattern.fullmatch(text):
        _fail(
            path,
            f"{text!r} is not a valid {what}; use lowercase letters, digits and '-' "
            f"(1-{max_len} characters, starting and ending with a letter or digit)",
        )
    return text


def parse_size(value: str | int) -> int:
    """Bytes from ``512Mi``, ``1Gi``, ``1G``, ``500k`` or plain ``1024``; ``ValueError`` if not."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value)):
        size = math.ceil(Decimal(match[1]) * _SIZE_UNITS.get(match[2] or "", 1))
    else:
        raise ValueError(f"{_show(value)} is not a size")
    if size <= 0:
        raise ValueError(f"{_show(value)} is not a positive size")
    return size


def parse_cpu(value: str | float) -> float:
    """Cores from ``"1"``, ``0.5``, ``2`` or ``"500m"`` (millicores); ``ValueError`` if not."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            cores = float(value)
        elif isinstance(value, str) and (match := _CPU_RE.fullmatch(value)):
            cores = float(match[1]) / (1000 if match[2] else 1)
        else:
            raise ValueError(f"{_show(value)} is not a CPU amount")
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{_show(value)} is not a finite CPU amount") from None
    if not (math.isfinite(cores) and cores > 0):
        raise ValueError(f"{_show(value)} is not a positive CPU amount")
    return cores


def _runtime(raw: object) -> RuntimeSpec:
    fields = _mapping(raw, "spec.runtime", {"timeout", "memory_limit", "cpu_limit"})
    timeout = fields.get("timeout", 300.0)
    # `not a < t <= b` is also true for NaN; an int too big for a float compares fine.
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        _fail(
            "spec.runtime.timeout",
            f"must be a number of seconds above 0 and at most {MAX_TIMEOUT:.0f} (a day), "
            f"got {_show(timeout)}",
        )
    memory = cpu = None
    if (raw_memory := fields.get("memory_limit")) is not None:
        try:
            memory = parse_size(raw_memory)
        except ValueError:
            _fail(
                "spec.runtime.memory_limit",
                f"{_show(raw_memory)} is not a size; use e.g. 512Mi or 1Gi",
            )
        if memory > MAX_MEMORY:
            _fail("spec.runtime.memory_limit", f"{_show(raw_memory)} is more than 1Ti")
    if (raw_cpu := fields.get("cpu_limit")) is not None:
        try:
            cpu = parse_cpu(raw_cpu)
        except ValueError:
            _fail(
                "spec.runtime.cpu_limit",
                f'{_show(raw_cpu)} is not a CPU amount; use e.g. "1", 0.5 or "500m"',
            )
        if cpu > MAX_CPU:
            _fail("spec.runtime.cpu_limit", f"{_show(raw_cpu)} is more than {MAX_CPU:.0f} cores")
    return RuntimeSpec(timeout=float(timeout), memory_limit=memory, cpu_limit=cpu)


def _sandbox(raw: object) -> SandboxSpec:
    allowed = {"kind", "command", "warm_pool", "env", "template_id", "network"}
    fields = _mapping(raw, "spec.sandbox", allowed)
    kind = fields.get("kind", "inprocess")
    if kind not in ("inprocess", "process"):
        _fail("spec.sandbox.kind", f"must be 'inprocess' or 'process', got {_show(kind)}")
    for key in ("command", "warm_pool", "env", "network"):
        if kind == "inprocess" and fields.get(key) not in (None, 0, {}):
            _fail(
                f"spec.sandbox.{key}",
                "only process sandboxes take it; set spec.sandbox.kind: process",
            )
    command = fields.get("command")
    if command is not None and (
        not isinstance(command, list)
        or not command
        or not all(isinstance(arg, str) and arg and "\x00" not in arg for arg in command)
    ):
        _fail("spec.sandbox.command", f"must be a non-empty list of strings, got {_show(command)}")
    warm_pool = fields.get("warm_pool", 0)
    if (
        isinstance(warm_pool, bool)
        or not isinstance(warm_pool, int)
        or not 0 <= warm_pool <= MAX_WARM_POOL
    ):
        _fail(
            "spec.sandbox.warm_pool",
            f"must be an integer from 0 to {MAX_WARM_POOL}, got {_show(warm_pool)}",
        )
    raw_env = fields.get("env") or {}
    if not isinstance(raw_env, dict):
        _fail("spec.sandbox.env", f"must be a mapping, got {_kind(raw_env)}")
    env: dict[str, str] = {}
    for key, value in raw_env.items():
        if not isinstance(key, str) or not _ENV_NAME_RE.fullmatch(key):
            _fail(f"spec.sandbox.env.{_key(key)}", "is not a valid environment variable name")
        env[key] = _text(value, f"spec.sandbox.env.{key}", max_len=32768)
    template_id = fields.get("template_id")
    if template_id is not None:
        template_id = _slug(template_id, "spec.sandbox.template_id", _ID_RE, 63, "id")
    network = fields.get("network", False)
    if not isinstance(network, bool):
        _fail("spec.sandbox.network", f"must be true or false, got {_kind(network)}")
    return SandboxSpec(
        kind=kind,
        command=command,
        warm_pool=warm_pool,
        env=env,
        template_id=template_id,
        network=network,
    )


def _entrypoint(value: object, command: list[str] | None) -> str:
    text = _text(value, "spec.entrypoint", max_len=1024)
    path = PurePosixPath(text)
    if "\\" in text or path.is_absolute() or ".." in path.parts or not path.parts:
        _fail("spec.entrypoint", f"{text!r} must be a relative path inside the agent directory")
    if command is None and path.suffix != ".py":
        _fail("spec.entrypoint", f"{text!r} must be a Python file (.py) unless a command is set")
    return str(path)


def parse_agent_yaml(text: str) -> AgentSpec:
    """Validate the text of a ``.ppio-agent.yaml`` (no file checks; see :func:`load_agent_spec`).

    >>> spec = parse_agent_yaml("apiVersion: v1\\nkind: Agent\\nmetadata: {name: echo}\\n"
    ...                         "spec: {entrypoint: agent.py, runtime: {memory_limit: 1Gi}}")
    >>> spec.name, spec.runtime.memory_limit
    ('echo', 1073741824)
    """
    doc = load_agent_yaml(text)
    top = _mapping(doc, AGENT_FILE, {"apiVersion", "kind", "metadata", "spec", "status"})
    if not top:
        _fail(AGENT_FILE, "empty; expected apiVersion, kind, metadata and spec")
    if (api_version := top.get("apiVersion")) != "v1":
        _fail("apiVersion", f"must be 'v1', got {_show(api_version)}")
    if (kind := top.get("kind")) != "Agent":
        _fail("kind", f"must be 'Agent', got {_show(kind)}")
    allowed_meta = {"name", "version", "author", "description", "created"}
    meta = _mapping(top.get("metadata"), "metadata", allowed_meta)
    spec = _mapping(top.get("spec"), "spec", {"entrypoint", "runtime", "sandbox", "envVars"})
    name = _slug(meta.get("name"), "metadata.name", _NAME_RE, 48, "name")
    runtime, sandbox = _runtime(spec.get("runtime")), _sandbox(spec.get("sandbox"))
    return AgentSpec(
        name=name,
        version=_text(meta.get("version"), "metadata.version", default="0.0.0", max_len=64),
        author=_text(meta.get("author"), "metadata.author", default=""),
        description=_text(
            meta.get("description"), "metadata.description", default="", max_len=4096
        ),
        entrypoint=_entrypoint(spec.get("entrypoint"), sandbox.command),
        runtime=runtime,
        sandbox=sandbox,
    )


def _read_agent_file(real_root: str) -> bytes:
    """The agent file's bytes: a regular file (or a symlink to one) inside the directory."""
    where = _resolve(os.path.join(real_root, AGENT_FILE))
    if where is None:
        _fail(AGENT_FILE, _SYMLINK_LOOP)
    if not _inside(real_root, where):
        _fail(AGENT_FILE, "a symlink that resolves outside the agent directory")
    try:
        info = os.stat(where)
    except (FileNotFoundError, NotADirectoryError):
        _fail(AGENT_FILE, "not found at the top of the agent directory")
    except OSError as exc:
        _fail(AGENT_FILE, f"cannot be read ({exc.strerror})")
    if not stat.S_ISREG(info.st_mode):  # a directory, or a FIFO that would block the read
        _fail(AGENT_FILE, "not a regular file")
    if info.st_size > _MAX_YAML_BYTES:
        _fail(AGENT_FILE, f"larger than {_MAX_YAML_BYTES} bytes")
    with open(where, "rb") as file:
        raw = file.read(_MAX_YAML_BYTES + 1)
    if len(raw) > _MAX_YAML_BYTES:
        _fail(AGENT_FILE, f"larger than {_MAX_YAML_BYTES} bytes")
    return raw


def load_agent_spec(directory: Path) -> AgentSpec:
    """Read and validate ``directory/.ppio-agent.yaml``; the entrypoint must be a file inside.

    Symlinks are followed (at most 40 in a chain) but must stay inside the
    directory; a loop is a ``ValidationError`` naming the file.
    """
    real_root = os.path.realpath(Path(directory))
    raw = _read_agent_file(real_root)
    try:
        spec = parse_agent_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError:
        _fail(AGENT_FILE, "not UTF-8 text")
    entry = _resolve(os.path.join(real_root, spec.entrypoint))
    if entry is None:
        _fail("spec.entrypoint", f"{spec.entrypoint!r} is a {_SYMLINK_LOOP}")
    if not _inside(real_root, entry):
        _fail("spec.entrypoint", f"{spec.entrypoint!r} resolves outside the agent directory")
    if not os.path.isfile(entry):
        _fail("spec.entrypoint", f"{spec.entrypoint!r} is not a file in the agent directory")
    return spec


def template_id_for(spec: AgentSpec, digest: str) -> str:
    """``spec.sandbox.template_id`` when set, else ``<name>-<digest[:8]>``.

    >>> template_id_for(AgentSpec(name="echo", entrypoint="agent.py"), "0123456789abcdef")
    'echo-01234567'
    """
    if spec.sandbox.template_id is not None:
        return _slug(spec.sandbox.template_id, "spec.sandbox.template_id", _ID_RE, 63, "id")
    return f"{spec.name}-{digest[:8]}"
