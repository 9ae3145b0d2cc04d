"""Agent templates: the ``.ppio-agent.yaml`` spec, and where deployed templates live.

A template is an agent project directory with a ``.ppio-agent.yaml``
(``apiVersion: v1``, ``kind: Agent``, ``metadata``, ``spec``; ``status`` is
written back by the CLI and ignored here). :func:`parse_agent_yaml` and
:func:`load_agent_spec` validate it without executing anything; every
problem raises ``ValidationError`` whose message starts with the field's
path, e.g. ``spec.runtime.memory_limit: '12Zi' is not a size; use e.g. 512Mi
or 1Gi``. Unknown keys are refused (a typo must not be silently ignored),
except ``metadata.created`` and ``spec.envVars`` that the original PPIO CLI
writes. Numbers other than integers must be quoted where a string is meant
(YAML would turn ``version: 1.10`` into ``1.1``). The ``status`` block is
not part of a template's content: :func:`pack_directory` leaves it out, so
the CLI writing it back does not change the digest.

Template ids. A template's id is ``<metadata.name>-<first 8 hex of its
content digest>`` unless ``spec.sandbox.template_id`` names one: stable (the
same content always gets the same id, so redeploying it is a no-op), human
friendly, and changed content gets a new id while the old one keeps
serving. An explicit id is instead updated in place by a changed deploy.
The AgentCore-style agent id of ``POST /v1/agents/{agent_id}/invocations``
is a template id or a bare name; a name resolves to the most recently
deployed template with that name (:meth:`TemplateStore.resolve`).

Storage (:class:`TemplateStore`). Rows live in ``data_dir/templates.sqlite3``
(a row per tenant and id: ids, explicit ones included, name templates within
their tenant, so two tenants may hold one id, with the same content or not;
identical content shares its files). Files live in
``data_dir/templates/<digest>/`` and are shared by every row with that
digest; a template's ``digest`` says which content it runs, so caches keyed
by ``(id, digest)`` notice an in-place update. Rules on :meth:`~TemplateStore.open`:

* a template left ``pending`` or ``building`` by a crash is marked
  ``failed`` with the error ``interrupted by a restart``; deploying the same
  content again retries it (a failed template redeployed goes back to
  ``pending``), so nothing stays pending with no builder behind it;
* file directories no row uses any more (left behind by in-place updates,
  whose old files may still be in use until the restart) are removed.

One process owns a data directory at a time (an exclusive lock file).
"""

from __future__ import annotations

import builtins
import fcntl
import functools
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Self, TypeVar, get_args

import anyio
import anyio.to_thread
import msgspec

from ppio_sandbox.agent_runtime.errors import TemplateNotFoundError

from ._archive import (
    AGENT_FILE,
    MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_FILES,
    content_hash,
    pack_directory,
    unpack_archive,
)
from ._template_spec import (
    AgentSpec,
    RuntimeSpec,
    SandboxSpec,
    load_agent_spec,
    parse_agent_yaml,
    parse_cpu,
    parse_size,
    template_id_for,
)

__all__ = [
    "AGENT_FILE",
    "AgentSpec",
    "Phase",
    "RuntimeSpec",
    "SandboxSpec",
    "Template",
    "TemplateStore",
    "content_hash",
    "load_agent_spec",
    "pack_directory",
    "parse_agent_yaml",
    "parse_cpu",
    "parse_size",
    "template_id_for",
    "unpack_archive",
]

Phase = Literal["pending", "building", "deployed", "failed"]
_PHASES = frozenset(get_args(Phase))
_BUILD_LOG_BYTES = 4096
#: Uploads unpacked, parsed and hashed at once; the rest wait their turn.
MAX_CONCURRENT_UPLOADS = 2


class Template(msgspec.Struct, frozen=True, kw_only=True):
    """A deployed (or deploying) template as the store records it.

    ``path`` is the directory holding its files; ``build_log`` the last 4 KB
    of its build output; ``error`` why it failed; times are epoch seconds.
    """

    id: str
    name: str
    version: str
    tenant: str
    phase: Phase
    spec: AgentSpec
    digest: str
    path: str
    created_at: float
    updated_at: float
    deployed_at: float | None = None
    build_log: str = ""
    error: str | None = None


# -- storage ------------------------------------------------------------------

_T = TypeVar("_T")
_SPEC_DECODER = msgspec.json.Decoder(AgentSpec)
_SPEC_ENCODER = msgspec.json.Encoder()
_COLUMNS = (
    "id, name, version, tenant, phase, spec, digest, created_at, updated_at, deployed_at,"
    " build_log, error"
)
_COLUMN_NAMES = tuple(_COLUMNS.replace(" ", "").split(","))
_SCHEMA = """
CREATE TABLE templates (
    id TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, tenant TEXT NOT NULL,
    phase TEXT NOT NULL, spec BLOB NOT NULL, digest TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, deployed_at REAL,
    build_log TEXT NOT NULL, error TEXT,
    PRIMARY KEY (tenant, id));
CREATE INDEX templates_by_id ON templates (id);
CREATE INDEX templates_by_name ON templates (tenant, name, deployed_at);
CREATE INDEX templates_by_digest ON templates (digest);
PRAGMA user_version = 1;
"""


def _where(column: str, value: str, tenant: str | None) -> tuple[str, tuple[str, ...]]:
    if tenant is None:
        return f"WHERE {column} = ?", (value,)
    return f"WHERE {column} = ? AND tenant = ?", (value, tenant)


def _tail(log: str) -> str:
    data = log.encode("utf-8", "replace")
    return data[-_BUILD_LOG_BYTES:].decode("utf-8", "ignore")


class TemplateStore:
    """Deployed templates: rows in SQLite, files stored once per content digest.

    Every method is async and runs its blocking work (sqlite3, files, tar) in
    a worker thread; one connection, guarded by a lock, serves them all.
    Uploads (unpacking, parsing, hashing: the heavy part) run on threads of
    their own, at most :data:`MAX_CONCURRENT_UPLOADS` at a time, so a flood
    of them neither blocks the event loop nor takes the shared thread pool
    that every other store call (and the rest of the server) waits on.

    >>> async def deploy(data_dir: Path, agent_dir: Path) -> Template:  # doctest: +SKIP
    ...     async with TemplateStore(data_dir) as store:
    ...         template = await store.register_directory(agent_dir, tenant="acme")
    ...         return await store.set_phase(template.id, "deployed", log="ping ok")
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        max_archive_bytes: int = MAX_ARCHIVE_BYTES,
        max_files: int = MAX_ARCHIVE_FILES,
        shared: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.max_archive_bytes = max_archive_bytes
        self.max_files = max_files
        self.shared = shared
        """One of the workers of ``serve --workers N``: the supervisor holds the data
        directory's lock and did the crash recovery; this store only reads and writes."""
        self._files = self.data_dir / "templates"
        self._tmp = self.data_dir / "tmp" / str(os.getpid()) if shared else self.data_dir / "tmp"
        self._data_version: int | None = None
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._last_time = 0.0
        self._uploads = anyio.CapacityLimiter(MAX_CONCURRENT_UPLOADS)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, func: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(functools.partial(func, *args))

    async def _run_upload(self, func: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(functools.partial(func, *args), limiter=self._uploads)

    async def open(self) -> None:
        """Open (creating if needed) the database and recover from a crash."""
        await self._run(self._open_sync)

    async def close(self) -> None:
        """Close the database; safe to call twice, and finishes even when cancelled."""
        with anyio.CancelScope(shield=True):
            await self._run(self._close_sync)

    async def put_archive(self, data: bytes, tenant: str) -> Template:
        """Store an uploaded agent archive (tar.gz) for ``tenant``, phase ``pending``.

        Identical content already deployed by this tenant returns the existing
        record (a ``failed`` one goes back to ``pending``, so it is retried).
        Raises ``ValidationError`` for an unsafe archive or a bad spec.
        """
        return await self._run_upload(self._put_sync, data, tenant)

    async def register_directory(self, path: Path, tenant: str) -> Template:
        """Pack an agent directory and store it exactly as an upload would be."""
        data = await self._run_upload(pack_directory, Path(path))
        return await self.put_archive(data, tenant)

    async def set_phase(
        self,
        template_id: str,
        phase: Phase,
        *,
        log: str | None = None,
        error: str | None = None,
        tenant: str | None = None,
    ) -> Template:
        """Record a build step. ``log`` replaces the stored log (its last 4 KB are
        kept; None keeps it); ``error`` is stored as given."""
        if phase not in _PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        return await self._run(self._set_phase_sync, template_id, phase, log, error, tenant)

    async def get(self, template_id: str, tenant: str | None = None) -> Template:
        """The template with this id, seen by ``tenant`` (None: any tenant).

        Raises ``TemplateNotFoundError`` for an unknown id or another tenant's.
        """
        return await self._run(self._get_sync, template_id, tenant)

    async def resolve(self, agent_id: str, tenant: str | None = None) -> Template:
        """A template id (any phase), else the newest deployed template named ``agent_id``."""
        return await self._run(self._resolve_sync, agent_id, tenant)

    async def list(self, tenant: str | None = None) -> list[Template]:
        """The tenant's templates (None: everyone's), most recently updated first."""
        where, args = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        return await self._run(self._query, where + " ORDER BY updated_at DESC, id", args)

    async def delete(self, template_id: str, tenant: str | None = None) -> Template:
        """Forget a template; its files go too unless another template uses them.

        Sessions running it should be closed first. Returns the deleted record.
        """
        return await self._run(self._delete_sync, template_id, tenant)

    # -- the worker-thread side --

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise RuntimeError("TemplateStore is not open")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _now(self) -> float:
        # Strictly increasing, so "most recently deployed" is never a tie.
        self._last_time = max(time.time(), self._last_time + 1e-6)
        return self._last_time

    def _open_sync(self) -> None:
        if self._db is not None:
            return
        self._files.mkdir(parents=True, exist_ok=True)
        if not self.shared:
            lock_fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                raise RuntimeError(f"{self.data_dir} is in use by another TemplateStore") from None
            self._lock_fd = lock_fd
        try:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp.mkdir(parents=True)
            self._db = db = sqlite3.connect(
                self.data_dir / "templates.sqlite3", check_same_thread=False, isolation_level=None
            )
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA busy_timeout = 5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.executescript(f"BEGIN; {_SCHEMA} COMMIT;")
            elif version != 1:
                raise RuntimeError(f"templates.sqlite3 has schema {version}; this code knows 1")
        except BaseException:
            self._close_sync()
            raise
        if self.shared:
            return  # the supervisor recovered the directory before starting the workers
        with self._transaction():
            db.execute(
                "UPDATE templates SET phase = 'failed', error = 'interrupted by a restart',"
                " updated_at = ? WHERE phase IN ('pending', 'building')",
                (self._now(),),
            )
            used = {row[0] for row in db.execute("SELECT DISTINCT digest FROM templates")}
        for entry in self._files.iterdir():
            if entry.name not in used:
                shutil.rmtree(entry, ignore_errors=True)

    def _close_sync(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            if self.shared:
                shutil.rmtree(self._tmp, ignore_errors=True)

    async def changed_elsewhere(self) -> bool:
        """Whether another process (another worker) changed the templates since the last call."""

        def check() -> bool:
            with self._lock:
                if self._db is None:
                    return False
                version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
            changed = self._data_version is not None and version != self._data_version
            self._data_version = version
            return changed

        return await self._run(check)

    def _template(self, row: tuple[Any, ...]) -> Template:
        fields = dict(zip(_COLUMN_NAMES, row, strict=True))
        fields["spec"] = _SPEC_DECODER.decode(fields["spec"])
        return Template(path=str(self._files / fields["digest"]), **fields)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> builtins.list[Template]:
        with self._transaction() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM templates {sql}", args).fetchall()
        return [self._template(row) for row in rows]

    def _get_sync(self, template_id: str, tenant: str | None) -> Template:
        where, args = _where("id", template_id, tenant)
        found = self._query(where + " ORDER BY updated_at DESC LIMIT 1", args)
        if not found:
            raise TemplateNotFoundError(f"template {template_id!r} not found")
        return found[0]

    def _resolve_sync(self, agent_id: str, tenant: str | None) -> Template:
        try:
            return self._get_sync(agent_id, tenant)
        except TemplateNotFoundError:
            pass
        where, args = _where("name", agent_id, tenant)
        order = " ORDER BY phase = 'deployed' DESC, deployed_at DESC, updated_at DESC"
        named = self._query(where + order, args)
        if named and named[0].phase == "deployed":
            return named[0]
        if named:
            raise TemplateNotFoundError(f"agent {agent_id!r} has no deployed template yet")
        raise TemplateNotFoundError(f"no template or agent named {agent_id!r}")

    def _put_sync(self, data: bytes, tenant: str) -> Template:
        work = Path(tempfile.mkdtemp(dir=self._tmp))
        try:
            src = work / "src"
            unpack_archive(data, src, max_bytes=self.max_archive_bytes, max_files=self.max_files)
            children = list(src.iterdir())
            only = children[0] if len(children) == 1 else None
            if not (src / AGENT_FILE).exists() and only and only.is_dir() and not only.is_symlink():
                src = only  # an archive of the folder rather than of its contents
            spec = load_agent_spec(src)
            digest = content_hash(pack_directory(src))
            return self._record(spec, digest, src, tenant)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _record(self, spec: AgentSpec, digest: str, src: Path, tenant: str) -> Template:
        template_id = template_id_for(spec, digest)
        with self._transaction() as db:
            # Ids are per tenant: another tenant's template of this id is none of
            # this one's business (not even whether it exists).
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM templates WHERE id = ? AND tenant = ?",
                (template_id, tenant),
            )
            found = [self._template(row) for row in rows.fetchall()]
            mine = found[0] if found else None
            files = self._files / digest
            if not files.exists():
                os.rename(src, files)
            if mine is not None and mine.digest == digest and mine.phase != "failed":
                return mine
            now = self._now()
            record = Template(
                id=template_id,
                name=spec.name,
                version=spec.version,
                tenant=tenant,
                phase="pending",
                spec=spec,
                digest=digest,
                path=str(files),
                created_at=now if mine is None else mine.created_at,
                updated_at=now,
            )
            values = [getattr(record, column) for column in _COLUMN_NAMES]
            values[_COLUMN_NAMES.index("spec")] = _SPEC_ENCODER.encode(spec)
            marks = ", ".join("?" * len(values))
            db.execute(f"INSERT OR REPLACE INTO templates ({_COLUMNS}) VALUES ({marks})", values)
        return record

    def _set_phase_sync(
        self, template_id: str, phase: Phase, log: str | None, error: str | None, tenant: str | None
    ) -> Template:
        where, key = _where("id", template_id, tenant)
        tail = None if log is None else _tail(log)
        with self._transaction() as db:
            now = self._now()  # under the lock: _now is not thread-safe
            updated = db.execute(
                "UPDATE templates SET phase = ?, error = ?, updated_at = ?,"
                " build_log = COALESCE(?, build_log), deployed_at = COALESCE(?, deployed_at) "
                + where,
                (phase, error, now, tail, now if phase == "deployed" else None, *key),
            )
            if updated.rowcount == 0:
                raise TemplateNotFoundError(f"template {template_id!r} not found")
        return self._get_sync(template_id, tenant)

    def _delete_sync(self, template_id: str, tenant: str | None) -> Template:
        where, args = _where("id", template_id, tenant)
        trash: builtins.list[Path] = []
        with self._transaction() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM templates {where}", args).fetchall()
            if not rows:
                raise TemplateNotFoundError(f"template {template_id!r} not found")
            doomed = [self._template(row) for row in rows]
            db.execute(f"DELETE FROM templates {where}", args)
            for digest in {t.digest for t in doomed}:
                in_use = db.execute("SELECT 1 FROM templates WHERE digest = ?", (digest,))
                if in_use.fetchone() is None and (self._files / digest).exists():
                    # Renamed under the lock, removed outside it: a concurrent
                    # deploy of the same content re-creates the directory.
                    trash.append(self._tmp / f"deleted-{digest}-{os.urandom(4).hex()}")
                    os.rename(self._files / digest, trash[-1])
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)
        return max(doomed, key=lambda t: t.updated_at)
