"""The template archive format, shared by the client (which packs) and the
orchestrator (which unpacks and hashes).

:func:`pack_directory` gives the same bytes for the same directory contents,
whatever the files' mtimes, owners or the order the filesystem lists them in:
entries are sorted, mtimes and ids zeroed, modes normalised to 0644/0755, and
the gzip header carries no name or time. Build junk (``.git``,
``__pycache__``, ``.venv``, tool caches, ``*.pyc``) is left out, and so is
the ``status`` block of the top-level ``.ppio-agent.yaml``: the CLI writes it
back after every deploy, and deploy output must not change the content.
:func:`content_hash` hashes the *uncompressed* tar stream, so the digest does
not depend on the gzip level or zlib build either.

Every parse of a ``.ppio-agent.yaml`` goes through :func:`load_agent_yaml`,
which treats the text as hostile: at most :data:`MAX_AGENT_FILE_BYTES`, no
anchors or aliases (a "billion laughs" document of a few hundred bytes
would otherwise expand to a tree of billions of nodes, and comparing or
printing it holds the GIL for seconds), at most :data:`MAX_YAML_DEPTH`
levels of nesting (deeper ones would exhaust the recursion limit) and at
most :data:`MAX_YAML_NODES` values (pure-Python YAML costs ~50 us a value),
all refused while composing, before anything is built.

Not imported by :mod:`ppio_sandbox.agent_runtime` itself: agents never load it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ValidationError

__all__ = [
    "AGENT_FILE",
    "MAX_AGENT_FILE_BYTES",
    "MAX_PATH_DEPTH",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "SKIPPED_NAMES",
    "content_hash",
    "load_agent_yaml",
    "pack_directory",
]

AGENT_FILE = ".ppio-agent.yaml"
#: The largest ``.ppio-agent.yaml`` accepted.
MAX_AGENT_FILE_BYTES = 256 * 1024
#: The deepest nesting of YAML collections accepted in it.
MAX_YAML_DEPTH = 32
#: The most YAML values (scalars and collections) accepted in it.
MAX_YAML_NODES = 10_000
_MAX_INT_DIGITS = 100
#: The most directory levels a template path may have.
MAX_PATH_DEPTH = 64
#: Names never packed nor unpacked, at any depth (plus any ``*.pyc`` file).
SKIPPED_NAMES = frozenset(
    {".git", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_LINKS = 40  # Linux's MAXSYMLINKS
_MAX_RESOLVE_STEPS = 1024
_SYMLINK_LOOP = f"symlink loop (or a chain of more than {_MAX_LINKS} links)"


class _AgentYAMLLoader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors, aliases and deep nesting as it composes.

    Each check runs on the parser's next event, before the node is built, so
    a hostile document costs no more than reading it.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed", mark
            )
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_YAML_NODES} values", mark
            )
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        # A scalar that matches a type's pattern may still not convert:
        # 2025-13-45 as a date, an int of more than 4300 digits.
        try:
            data = super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value ({exc})", node.start_mark
            ) from None
        if isinstance(data, str):
            try:
                data.encode("utf-8")
            except UnicodeEncodeError:  # "\udcff": no JSON or database takes it
                raise yaml.constructor.ConstructorError(
                    None, None, "a string holds a lone surrogate (\\ud800-\\udfff)", node.start_mark
                ) from None
        return data

    def construct_yaml_int(self, node: Any) -> Any:
        # int() of thousands of digits is slow and past 4300 refused; no field needs 100.
        if len(node.value) > _MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"an integer of more than {_MAX_INT_DIGITS} digits; quote it if it is text",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


_AgentYAMLLoader.add_constructor("tag:yaml.org,2002:int", _AgentYAMLLoader.construct_yaml_int)


def load_agent_yaml(text: str) -> Any:
    """The data of a ``.ppio-agent.yaml``'s text, parsed safely (see the module's doc).

    Raises ``ValidationError`` (``.ppio-agent.yaml: not valid YAML: ... at
    line N``) for text that is not one YAML document, is larger than
    :data:`MAX_AGENT_FILE_BYTES`, or uses tags, anchors, aliases or nesting
    this format does not allow.

    >>> load_agent_yaml("a: [1, {b: c}]")
    {'a': [1, {'b': 'c'}]}
    >>> try:
    ...     load_agent_yaml("a: &x [1]")
    ... except ValidationError as exc:
    ...     print(exc.message)
    .ppio-agent.yaml: not valid YAML: anchors and aliases (&name, *name) are not allowed at line 1
    """
    too_big = len(text) > MAX_AGENT_FILE_BYTES  # then no need to encode it to know
    if too_big or len(text.encode("utf-8", "replace")) > MAX_AGENT_FILE_BYTES:
        raise ValidationError(f"{AGENT_FILE}: larger than {MAX_AGENT_FILE_BYTES} bytes")
    loader = _AgentYAMLLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        problem = str(exc)
        if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
            context = exc.context if exc.context and exc.context.startswith("expected") else ""
            problem = ", ".join(filter(None, (context, exc.problem)))
            if exc.problem_mark is not None:
                problem += f" at line {exc.problem_mark.line + 1}"
        raise ValidationError(f"{AGENT_FILE}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()


def _skipped(parts: Sequence[str]) -> bool:
    return any(part in SKIPPED_NAMES for part in parts) or parts[-1].endswith(".pyc")


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _resolve(path: str) -> str | None:
    """``os.path.realpath(path)`` for an absolute ``path``, or None for a symlink loop.

    Like the kernel, it follows at most :data:`_MAX_LINKS` symlinks and
    gives up past that (None, like a loop: ``a -> b``, ``b -> a``), and it
    gives up after :data:`_MAX_RESOLVE_STEPS` path components too, so each
    call costs a bounded number of ``lstat`` calls. ``os.path.realpath``
    instead recurses once per link (a chain of thousands exhausts the
    recursion limit) and ``Path.resolve`` raises ``RuntimeError`` on a loop.
    A missing component is kept as written, as ``realpath`` does when not
    strict.
    """
    pending = path.split("/")[::-1]  # a stack: the next component last
    resolved, links, steps = "", 0, 0
    while pending:
        name = pending.pop()
        steps += 1
        if steps > _MAX_RESOLVE_STEPS:
            return None
        if name in ("", "."):
            continue
        if name == "..":
            resolved = resolved.rpartition("/")[0]
            continue
        candidate = f"{resolved}/{name}"
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except OSError:
            is_link = False
        if not is_link:
            resolved = candidate
            continue
        links += 1
        if links > _MAX_LINKS:
            return None
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = ""
        pending.extend(target.split("/")[::-1])
    return resolved or "/"


def _link_leaves(parts: Sequence[str], link: str) -> bool:
    """Whether a symlink at ``parts`` to ``link`` is absolute or climbs out lexically."""
    lexical = posixpath.normpath(posixpath.join(*parts[:-1], link))
    return link.startswith("/") or lexical == ".." or lexical.startswith("../")


def _without_status(data: bytes) -> bytes:
    """The agent file minus its top-level ``status:`` block, if that is provably all."""
    lines = data.splitlines(keepends=True)
    kept, skipping = [], False
    for line in lines:
        if line.startswith(b"status:"):
            skipping = True
        elif not skipping or not (line[:1] in b" \t#" or not line.strip()):
            skipping = False
            kept.append(line)
    stripped = b"".join(kept)
    if stripped == data:
        return data
    try:  # keep the original unless the textual cut removed exactly `status`
        before = load_agent_yaml(data.decode("utf-8"))
        after = load_agent_yaml(stripped.decode("utf-8"))
    except (ValidationError, UnicodeDecodeError):
        return data
    if isinstance(before, dict) and {k: v for k, v in before.items() if k != "status"} == after:
        return stripped
    return data


def pack_directory(path: Path) -> bytes:
    """A deterministic tar.gz of the directory at ``path``.

    Symlinks are kept as symlinks and must point inside the directory;
    anything that is not a file, directory or symlink is refused
    (``ValidationError``).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "agent.py").write_text("x = 1")
    >>> pack_directory(d) == pack_directory(d)
    True
    """
    root = Path(path)
    if not root.is_dir():
        raise ValidationError(f"{root}: not a directory")
    real_root = os.path.realpath(root)
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        rel_base = base.relative_to(root).as_posix()
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_NAMES]
        for name in (*dirnames, *filenames):
            rel = name if rel_base == "." else f"{rel_base}/{name}"
            parts = rel.split("/")
            if _skipped(parts):
                continue
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise ValidationError(f"{rel!r}: the file name is not valid UTF-8") from None
            if len(parts) > MAX_PATH_DEPTH:  # checked before os.walk goes deeper
                raise ValidationError(f"{rel}: more than {MAX_PATH_DEPTH} directory levels deep")
            entries.append((rel, base / name))
    entries.sort()

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, full in entries:
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                target = os.readlink(full)
                where = _resolve(os.path.join(real_root, rel))
                if where is None:
                    raise ValidationError(f"{rel}: {_SYMLINK_LOOP}")
                if _link_leaves(rel.split("/"), target) or not _inside(real_root, where):
                    raise ValidationError(f"{rel}: symlink to {target!r} points outside {root}")
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
                tar.addfile(info)
            elif stat.S_ISDIR(mode):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif stat.S_ISREG(mode):
                content = full.read_bytes()
                if rel == AGENT_FILE:
                    content = _without_status(content)
                info.size, info.mode = len(content), 0o755 if mode & 0o100 else 0o644
                tar.addfile(info, io.BytesIO(content))
            else:
                raise ValidationError(f"{rel}: not a regular file, directory or symlink")
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


def content_hash(data: bytes) -> str:
    """SHA-256 (hex) of an archive made by :func:`pack_directory`.

    The uncompressed tar stream is hashed, so the same directory gives the
    same digest on any machine. Meant for archives this module made: the
    input is decompressed without limits.
    """
    raw = gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data
    return hashlib.sha256(raw).hexdigest()
