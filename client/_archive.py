"""Deterministic tar.gz of an agent directory, as the orchestrator accepts it.

The same directory always gives the same bytes (sorted entries, zeroed
mtimes and owners, normalised modes, no gzip name or time), so deploying
unchanged content is a no-op on the server (a template's id includes its
content hash). Build junk is left out, and so is the ``status:`` block of
the top-level ``.ppio-agent.yaml`` (the CLI writes it back after a deploy).
The orchestrator makes the same archive from the same rules; the client
keeps its own copy because the two never import each other.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from ppio_sandbox.agent_runtime.errors import ValidationError

__all__ = ["AGENT_FILE", "pack_directory"]

AGENT_FILE = ".ppio-agent.yaml"
_SKIPPED = frozenset(
    {".git", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)


def _skipped(parts: Sequence[str]) -> bool:
    return any(part in _SKIPPED for part in parts) or parts[-1].endswith(".pyc")


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _link_leaves(parts: Sequence[str], link: str) -> bool:
    lexical = posixpath.normpath(posixpath.join(*parts[:-1], link))
    return link.startswith("/") or lexical == ".." or lexical.startswith("../")


def _without_status(data: bytes) -> bytes:
    """The agent file minus its top-level ``status:`` block, if that is provably all."""
    kept, skipping = [], False
    for line in data.splitlines(keepends=True):
        if line.startswith(b"status:"):
            skipping = True
        elif not skipping or not (line[:1] in b" \t#" or not line.strip()):
            skipping = False
            kept.append(line)
    stripped = b"".join(kept)
    if stripped == data:
        return data
    try:
        before, after = yaml.safe_load(data), yaml.safe_load(stripped)
    except yaml.YAMLError:
        return data
    if isinstance(before, dict) and {k: v for k, v in before.items() if k != "status"} == after:
        return stripped
    return data


def pack_directory(path: Path) -> bytes:
    """A deterministic tar.gz of the agent directory at ``path``.

    Symlinks must point inside the directory; anything but files,
    directories and symlinks is refused (``ValidationError``).

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
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED]
        for name in (*dirnames, *filenames):
            rel = name if rel_base == "." else f"{rel_base}/{name}"
            if not _skipped(rel.split("/")):
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
                if _link_leaves(rel.split("/"), target) or not _inside(
                    real_root, os.path.realpath(full)
                ):
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
