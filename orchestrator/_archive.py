"""Safe unpacking of uploaded template archives; packing and hashing live in
:mod:`ppio_sandbox.agent_runtime.packaging` (shared with the client) and are
re-exported here.

:func:`unpack_archive` treats its input as hostile: no absolute paths, no
``..``, no devices or FIFOs, links only to places inside the destination and
no symlink loops, nothing written through a symlink, names that are UTF-8
and not absurdly long or deep, and hard limits on the total size and the
number of entries that are enforced while decompressing (a gzip bomb is cut
off, not inflated). Every refusal is a ``ValidationError`` naming the entry.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import IO, NoReturn

from ppio_sandbox.agent_runtime.errors import ValidationError
from ppio_sandbox.agent_runtime.packaging import (
    _SYMLINK_LOOP,
    AGENT_FILE,
    MAX_PATH_DEPTH,
    SKIPPED_NAMES,
    _inside,
    _link_leaves,
    _resolve,
    _skipped,
    content_hash,
    pack_directory,
)

__all__ = [
    "AGENT_FILE",
    "MAX_ARCHIVE_BYTES",
    "MAX_ARCHIVE_FILES",
    "SKIPPED_NAMES",
    "content_hash",
    "pack_directory",
    "unpack_archive",
]

MAX_ARCHIVE_BYTES = 50 * 1024 * 1024
MAX_ARCHIVE_FILES = 5000
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 16
# Tar headers (512 B each, more with PAX records for long names) on top of the
# file bytes: what the decompressed stream may add beyond ``max_bytes``.
_HEADER_ALLOWANCE = 4096
#: The longest entry name or link target (bytes), and the longest name component.
MAX_NAME_BYTES = 1024
_MAX_COMPONENT_BYTES = 255
# OSErrors that a hostile entry (not the server) causes while extracting.
_ENTRY_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR})


class _LimitedReader:
    """A read-only stream that refuses to yield more than ``limit`` bytes."""

    def __init__(self, raw: io.BufferedIOBase, limit: int) -> None:
        self._raw, self._limit, self._seen = raw, limit, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._seen += len(chunk)
        if self._seen > self._limit:
            _reject(f"archive expands to more than {self._limit} bytes")
        return chunk


def _reject(message: str) -> NoReturn:
    raise ValidationError(message)


def _shown(name: str) -> str:
    """``repr(name)``, cut short if long: error messages stay readable."""
    return repr(name) if len(name) <= 100 else f"{name[:60]!r}...({len(name)} characters)"


def _check_text(name: str, text: str, what: str) -> None:
    """Refuse entry ``name`` if ``text`` (its name or link target) is not UTF-8 or too long."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # tarfile turns undecodable bytes into surrogates
        _reject(f"archive entry {_shown(name)}: {what} is not valid UTF-8")
    if size > MAX_NAME_BYTES:
        _reject(f"archive entry {_shown(name)}: {what} is longer than {MAX_NAME_BYTES} bytes")


def _member_parts(name: str) -> tuple[str, ...]:
    _check_text(name, name, "the name")
    if "\x00" in name or "\\" in name:
        _reject(f"archive entry {_shown(name)}: backslashes and NUL bytes are not allowed")
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        _reject(f"archive entry {_shown(name)}: absolute paths are not allowed")
    if ".." in path.parts:
        _reject(f"archive entry {_shown(name)}: '..' would leave the destination")
    if len(path.parts) > MAX_PATH_DEPTH:
        _reject(f"archive entry {_shown(name)}: more than {MAX_PATH_DEPTH} directory levels deep")
    if any(len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES for part in path.parts):
        _reject(
            f"archive entry {_shown(name)}: a name component is longer than "
            f"{_MAX_COMPONENT_BYTES} bytes"
        )
    return path.parts


def _plain_dirs(root: str, parts: Sequence[str], *, create: bool) -> str:
    """The directory ``root/parts``, refusing any component that is not a real dir."""
    current = root
    for part in parts:
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(mode):
            _reject(f"archive entry under {'/'.join(parts)!r} goes through a non-directory")
    return current


def unpack_archive(
    data: bytes,
    dest: Path,
    *,
    max_bytes: int = MAX_ARCHIVE_BYTES,
    max_files: int = MAX_ARCHIVE_FILES,
) -> None:
    """Extract a tar.gz (or plain tar) into ``dest``, which must be new or empty.

    Raises ``ValidationError`` for an unsafe or oversize archive: absolute
    paths, ``..``, symlinks or hard links that lead outside ``dest``, device
    or FIFO entries, more than ``max_files`` entries, more than ``max_bytes``
    of file content. On error ``dest`` may hold part of the archive; the
    caller removes it. Entries :func:`pack_directory` leaves out are skipped.
    """
    if len(data) > max_bytes + _HEADER_ALLOWANCE * max_files:
        _reject(f"archive is larger than {max_bytes} bytes")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    raw: io.BufferedIOBase = io.BytesIO(data)
    if data[:2] == _GZIP_MAGIC:
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    stream = _LimitedReader(raw, max_bytes + _HEADER_ALLOWANCE * (max_files + 1))
    extractor = _Extractor(os.path.realpath(dest), max_bytes)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for count, member in enumerate(tar, start=1):
                if count > max_files:
                    _reject(f"archive has more than {max_files} entries")
                extractor.extract(tar, member)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        _reject(f"archive: not a valid tar.gz ({str(exc)[:200]})")
    except (ValueError, OverflowError) as exc:  # malformed headers tarfile does not vet
        _reject(f"archive: not a valid tar.gz ({type(exc).__name__}: {str(exc)[:200]})")
    extractor.check_symlinks()


class _Extractor:
    """Writes members one by one under ``root``, never through a symlink."""

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root, self.max_bytes, self.total = root, max_bytes, 0
        self.symlinks: list[tuple[str, str]] = []

    def extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        parts = _member_parts(name)
        if not parts or _skipped(parts):
            return
        try:
            target = os.path.join(_plain_dirs(self.root, parts[:-1], create=True), parts[-1])
            if member.isdir():
                _plain_dirs(self.root, parts, create=True)
            elif member.issym():
                link = member.linkname
                _check_text(name, link, "the link target")
                if "\x00" in link or not link:
                    _reject(f"archive entry {_shown(name)}: an empty or NUL link target")
                if _link_leaves(parts, link):
                    _reject(
                        f"archive entry {_shown(name)}: symlink to {_shown(link)} points outside"
                    )
                os.symlink(link, target)
                self.symlinks.append((name, target))
            elif member.islnk():
                source_parts = _member_parts(member.linkname)
                if not source_parts:
                    _reject(f"archive entry {_shown(name)}: hard link to a non-file")
                parent = _plain_dirs(self.root, source_parts[:-1], create=False)
                source = os.path.join(parent, source_parts[-1])
                if not stat.S_ISREG(os.lstat(source).st_mode):
                    _reject(f"archive entry {_shown(name)}: hard link to a non-file")
                self._count(os.path.getsize(source))
                _write_file(target, open(source, "rb"), os.stat(source).st_mode)  # noqa: SIM115
            elif member.isreg() and not member.issparse():
                self._count(member.size)
                fileobj = tar.extractfile(member)
                assert fileobj is not None  # a regular member always has a file object
                _write_file(target, fileobj, member.mode)
            else:
                _reject(
                    f"archive entry {_shown(name)}: only files, directories and links are allowed"
                )
        except FileExistsError:
            _reject(f"archive entry {_shown(name)} appears twice")
        except FileNotFoundError:
            _reject(
                f"archive entry {_shown(name)}: hard link to {_shown(member.linkname)}, "
                "not in the archive"
            )
        except OSError as exc:
            if exc.errno not in _ENTRY_ERRNOS:
                raise  # ENOSPC, EIO...: the server's fault, not the archive's
            _reject(f"archive entry {_shown(name)}: cannot be written ({exc.strerror})")

    def _count(self, size: int) -> None:
        self.total += size
        if self.total > self.max_bytes:
            _reject(f"archive holds more than {self.max_bytes} bytes of files")

    def check_symlinks(self) -> None:
        """Symlink chains (and loops) can only be judged once every link exists."""
        for name, link in self.symlinks:
            where = _resolve(link)
            if where is None:
                _reject(f"archive entry {_shown(name)}: {_SYMLINK_LOOP}")
            if not _inside(self.root, where):
                _reject(f"archive entry {_shown(name)}: symlink resolves outside the destination")


def _write_file(target: str, source: IO[bytes], mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(target, flags, 0o755 if mode & 0o100 else 0o644)
    with source, os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)
