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

import yaml

from .errors import ValidationError

__all__ = ["AGENT_FILE", "SKIPPED_NAMES", "content_hash", "pack_directory"]

AGENT_FILE = ".ppio-agent.yaml"
#: Names never packed nor unpacked, at any depth (plus any ``*.pyc`` file).
SKIPPED_NAMES = frozenset(
    {".git", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
_GZIP_MAGIC = b"\x1f\x8b"


def _skipped(parts: Sequence[str]) -> bool:
    return any(part in SKIPPED_NAMES for part in parts) or parts[-1].endswith(".pyc")


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


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
        before, after = yaml.safe_load(data), yaml.safe_load(stripped)
    except yaml.YAMLError:
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
                escapes = _link_leaves(rel.split("/"), target)
                if escapes or not _inside(real_root, os.path.realpath(full)):
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
