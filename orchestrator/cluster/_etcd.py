"""An async etcd v3 client over etcd's JSON/HTTP gateway, for asyncio and trio.

etcd serves its gRPC API as JSON over HTTP/1.1 at ``/v3/...`` (the grpc-gateway inside
every member). httpx speaks it on both anyio backends, where the gRPC clients are
asyncio-only. One ``httpx.AsyncClient`` keeps pooled keep-alive connections to every
endpoint; a call goes to the endpoint that last answered and fails over to the next on
connection errors and on "no leader" answers, within one deadline (``timeout``).

Wire facts (etcd 3.5, checked against real members):

* keys and values are base64 strings; int64 fields (revisions, lease ids, TTLs) come back
  as JSON strings (``"revision":"7"``); fields at their zero value are omitted (an empty
  value, ``succeeded: false``, a PUT event's ``type``, a watch id 0, a gone lease's TTL).
  Decoding is lax (msgspec ``strict=False``): strings and numbers both decode to ``int``.
* a unary error is ``{"error": msg, "code": grpc_code, "message": msg}`` with an HTTP
  status mapped from the gRPC code (404 lease not found, 400 compacted, 503 unavailable);
  a streaming endpoint (``/v3/watch``, ``/v3/lease/keepalive``) sends one JSON object per
  line, ``{"result": {...}}`` or ``{"error": {"grpc_code": .., "message": ..}}``.
* every request carries the gRPC metadata ``hasleader=true`` (header
  ``Grpc-Metadata-Hasleader``, as etcd's Go client's ``WithRequireLeader``): a member
  without a leader then answers ``503 etcdserver: no leader`` at once instead of holding a
  linearizable request until its own ~5 s + 2 election timeouts request timeout, and it
  ends a watch stream with that error after 3 election timeouts without a leader (without
  the header the watch just goes silent forever).

Errors: ``EtcdError``; ``EtcdUnavailable`` (no endpoint answered in time, no quorum, no
leader; ``ambiguous`` when a write may have been applied), ``EtcdLeaseNotFound``,
``EtcdCompacted``.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import anyio.abc
import httpx
import msgspec

__all__ = [
    "Compare",
    "DeleteResult",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdLeaseNotFound",
    "EtcdUnavailable",
    "KeyValue",
    "LeaseInfo",
    "LeaseKeeper",
    "Op",
    "PrefixCache",
    "PutResult",
    "RangeResult",
    "TxnResult",
    "Watch",
    "WatchBatch",
    "WatchEvent",
    "parse_cluster_url",
    "prefix_range_end",
]

Bytesish = bytes | str

# -- errors -------------------------------------------------------------------------


class EtcdError(Exception):
    """An etcd call failed; ``code`` is the gRPC status code, ``status`` the HTTP one."""

    def __init__(self, message: str, *, code: int = 0, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the timeout, or the cluster has no leader / no quorum.

    ``ambiguous`` is true when a write (put, delete, txn) was sent and may have been
    applied even so: read back before assuming either way.
    """

    def __init__(
        self, message: str, *, code: int = 14, status: int = 0, ambiguous: bool = False
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.ambiguous = ambiguous


class EtcdLeaseNotFound(EtcdError):
    """The lease does not exist (expired or revoked)."""


class EtcdCompacted(EtcdError):
    """The revision asked for was compacted away: re-list and watch from the new revision."""

    def __init__(self, message: str, *, compact_revision: int = 0, code: int = 11) -> None:
        super().__init__(message, code=code, status=400)
        self.compact_revision = compact_revision


# -- wire structs (decoding) ---------------------------------------------------------


class KeyValue(msgspec.Struct, frozen=True):
    """One key's state: ``create_revision`` is the revision that created it (it changes
    only when the key is deleted and created again), ``mod_revision`` the last write's,
    ``version`` the number of writes since creation, ``lease`` the lease id or 0."""

    key: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    value: bytes = b""
    lease: int = 0


class _Header(msgspec.Struct):
    revision: int = 0
    member_id: int = 0
    raft_term: int = 0


class _RangeResp(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)
    kvs: list[KeyValue] = msgspec.field(default_factory=list)
    more: bool = False
    count: int = 0


class _PutResp(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)
    prev_kv: KeyValue | None = None


class _DeleteResp(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)
    deleted: int = 0
    prev_kvs: list[KeyValue] = msgspec.field(default_factory=list)


class _ResponseOp(msgspec.Struct):
    response_range: _RangeResp | None = None
    response_put: _PutResp | None = None
    response_delete_range: _DeleteResp | None = None


class _TxnResp(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)
    succeeded: bool = False
    responses: list[_ResponseOp] = msgspec.field(default_factory=list)


class _GrantResp(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)
    ID: int = 0
    TTL: int = 0
    error: str = ""


class _KeepAliveResp(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)
    ID: int = 0
    TTL: int = 0


class _TTLResp(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)
    ID: int = 0
    TTL: int = 0
    grantedTTL: int = 0  # the wire name
    keys: list[bytes] = msgspec.field(default_factory=list)


class _HeaderOnly(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)


class _StreamError(msgspec.Struct):
    grpc_code: int = 0
    http_code: int = 0
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: str | _StreamError | None = None
    code: int = 0
    message: str = ""


class _KeepAliveLine(msgspec.Struct):
    result: _KeepAliveResp | None = None
    error: _StreamError | None = None


class _WireEvent(msgspec.Struct):
    type: str = "PUT"
    kv: KeyValue = msgspec.field(default_factory=KeyValue)
    prev_kv: KeyValue | None = None


class _WatchResp(msgspec.Struct):
    header: _Header = msgspec.field(default_factory=_Header)
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: list[_WireEvent] = msgspec.field(default_factory=list)


class _WatchLine(msgspec.Struct):
    result: _WatchResp | None = None
    error: _StreamError | None = None


_range_dec = msgspec.json.Decoder(_RangeResp, strict=False)
_put_dec = msgspec.json.Decoder(_PutResp, strict=False)
_delete_dec = msgspec.json.Decoder(_DeleteResp, strict=False)
_txn_dec = msgspec.json.Decoder(_TxnResp, strict=False)
_grant_dec = msgspec.json.Decoder(_GrantResp, strict=False)
_keepalive_dec = msgspec.json.Decoder(_KeepAliveLine, strict=False)
_ttl_dec = msgspec.json.Decoder(_TTLResp, strict=False)
_header_dec = msgspec.json.Decoder(_HeaderOnly, strict=False)
_error_dec = msgspec.json.Decoder(_ErrorBody, strict=False)
_watch_dec = msgspec.json.Decoder(_WatchLine, strict=False)
_encode = msgspec.json.Encoder().encode  # bytes values encode as base64, as etcd wants


# -- results and request builders ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KeyValue]
    more: bool
    count: int


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int
    prev_kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: int
    prev_kvs: list[KeyValue]


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``succeeded``: whether every compare held (so ``success`` ran, else ``failure``);
    ``revision``: the store revision after the txn; one response per op that ran."""

    succeeded: bool
    revision: int
    responses: list[RangeResult | PutResult | DeleteResult]


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    id: int
    ttl: int  # seconds remaining
    granted_ttl: int
    keys: list[bytes]


def _b(x: Bytesish) -> bytes:
    return x.encode() if isinstance(x, str) else x


def prefix_range_end(prefix: Bytesish) -> bytes:
    """The ``range_end`` that makes ``[prefix, range_end)`` every key starting with prefix.

    The prefix with its last byte below 0xff incremented (trailing 0xff bytes dropped);
    ``b"\\0"`` (every key from ``prefix`` on) for an empty or all-0xff prefix.
    """
    p = bytearray(_b(prefix))
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


_RESULTS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """A txn guard on one key. Build with the class methods, e.g.
    ``Compare.create_revision(key, "==", 0)`` (the key is absent) or
    ``Compare.create_revision(owner_key, "==", n)`` (the owner key is still the one
    created at revision ``n``: a fence)."""

    key: bytes
    target: Literal["CREATE", "MOD", "VERSION", "VALUE", "LEASE"]
    op: CompareOp
    operand: int | bytes

    @classmethod
    def create_revision(cls, key: Bytesish, op: CompareOp, revision: int) -> Compare:
        return cls(_b(key), "CREATE", op, revision)

    @classmethod
    def mod_revision(cls, key: Bytesish, op: CompareOp, revision: int) -> Compare:
        return cls(_b(key), "MOD", op, revision)

    @classmethod
    def version(cls, key: Bytesish, op: CompareOp, version: int) -> Compare:
        return cls(_b(key), "VERSION", op, version)

    @classmethod
    def value(cls, key: Bytesish, op: CompareOp, value: Bytesish) -> Compare:
        return cls(_b(key), "VALUE", op, _b(value))

    @classmethod
    def lease(cls, key: Bytesish, op: CompareOp, lease_id: int) -> Compare:
        return cls(_b(key), "LEASE", op, lease_id)

    def to_json(self) -> dict[str, Any]:
        field = {
            "CREATE": "create_revision",
            "MOD": "mod_revision",
            "VERSION": "version",
            "VALUE": "value",
            "LEASE": "lease",
        }[self.target]
        operand = self.operand if isinstance(self.operand, bytes) else str(self.operand)
        return {
            "key": self.key,
            "target": self.target,
            "result": _RESULTS[self.op],
            field: operand,
        }


@dataclass(frozen=True, slots=True)
class Op:
    """A txn operation: ``Op.put``, ``Op.delete``, ``Op.range`` (``prefix=True`` for a
    whole prefix)."""

    kind: Literal["put", "delete", "range"]
    body: dict[str, Any]

    @classmethod
    def put(
        cls, key: Bytesish, value: Bytesish, *, lease: int | None = None, prev_kv: bool = False
    ) -> Op:
        body: dict[str, Any] = {"key": _b(key), "value": _b(value)}
        if lease:
            body["lease"] = str(lease)
        if prev_kv:
            body["prev_kv"] = True
        return cls("put", body)

    @classmethod
    def delete(cls, key: Bytesish, *, prefix: bool = False, prev_kv: bool = False) -> Op:
        body: dict[str, Any] = {"key": _b(key)}
        if prefix:
            body["range_end"] = prefix_range_end(key)
        if prev_kv:
            body["prev_kv"] = True
        return cls("delete", body)

    @classmethod
    def range(
        cls, key: Bytesish, *, prefix: bool = False, limit: int = 0, keys_only: bool = False
    ) -> Op:
        body: dict[str, Any] = {"key": _b(key)}
        if prefix:
            body["range_end"] = prefix_range_end(key)
        if limit:
            body["limit"] = str(limit)
        if keys_only:
            body["keys_only"] = True
        return cls("range", body)

    def to_json(self) -> dict[str, Any]:
        name = {"put": "request_put", "delete": "request_delete_range", "range": "request_range"}
        return {name[self.kind]: self.body}


# -- endpoints ------------------------------------------------------------------------


def parse_cluster_url(url: str) -> list[str]:
    """``etcd://h1:p1,h2:p2`` -> ``["http://h1:p1", "http://h2:p2"]``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "etcd":
        raise ValueError(f"not an etcd:// URL: {url!r}")
    hosts = [h.strip().rstrip("/") for h in rest.split(",") if h.strip()]
    if not hosts:
        raise ValueError(f"no endpoint in {url!r}")
    return [f"http://{h}" for h in hosts]


def _normalise(endpoint: str) -> str:
    endpoint = endpoint.strip().rstrip("/")
    if "://" not in endpoint:
        return f"http://{endpoint}"
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"etcd endpoint must be http(s)://host:port: {endpoint!r}")
    return endpoint


# Errors for which the request surely never reached etcd: safe to send elsewhere.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_UNAVAILABLE_CODES = {4, 8, 14}  # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE


def _error(status: int, code: int, message: str) -> EtcdError:
    low = message.lower()
    if "lease not found" in low:
        return EtcdLeaseNotFound(message, code=code, status=status)
    if "compacted" in low:
        return EtcdCompacted(message, code=code)
    if code in _UNAVAILABLE_CODES or "deadline exceeded" in low or "timed out" in low:
        return EtcdUnavailable(message, code=code, status=status)
    return EtcdError(message, code=code, status=status)


def _error_from_body(status: int, body: bytes) -> EtcdError:
    try:
        e = _error_dec.decode(body)
    except msgspec.DecodeError:
        return EtcdError(f"HTTP {status}: {body[:200]!r}", status=status)
    if isinstance(e.error, _StreamError):
        return _error(status, e.error.grpc_code, e.error.message)
    return _error(status, e.code, e.message or e.error or f"HTTP {status}")


def _rejected_before_apply(e: EtcdError) -> bool:
    # The hasleader interceptor and rate limiting reject before the request is proposed.
    return isinstance(e, EtcdUnavailable) and (
        "no leader" in str(e) or "too many requests" in str(e)
    )


# -- the client -----------------------------------------------------------------------


class EtcdClient:
    """An etcd v3 client over the JSON gateway; use ``async with`` or ``aclose()``.

    ``endpoints``: client URLs (``http://host:port`` or ``host:port``), see also
    ``parse_cluster_url``. ``timeout``: the deadline of each call in seconds, failover
    included. Linearizable reads, keepalives and idempotent writes (put, delete) are
    retried on the next endpoint until the deadline; a txn only when etcd surely did not
    get it (connection refused, "no leader"), else ``EtcdUnavailable(ambiguous=True)``.
    """

    def __init__(self, endpoints: list[str], *, timeout: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.endpoints = [_normalise(e) for e in endpoints]
        self.timeout = timeout
        self._current = 0
        self._http = httpx.AsyncClient(
            headers={"Content-Type": "application/json", "Grpc-Metadata-Hasleader": "true"},
            timeout=httpx.Timeout(timeout, connect=min(timeout / 2, 1.0)),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=32),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def current_endpoint(self) -> str:
        """The endpoint the next call tries first (the last one that answered)."""
        return self.endpoints[self._current]

    def _order(self) -> Iterator[int]:
        n = len(self.endpoints)
        start = self._current
        return ((start + k) % n for k in range(n))

    def _failed(self, i: int) -> None:
        if self._current == i:
            self._current = (i + 1) % len(self.endpoints)

    async def _call(self, path: str, body: dict[str, Any], *, idempotent: bool) -> bytes:
        """POST ``body`` to ``path``, failing over until ``timeout``; the 200 body."""
        payload = _encode(body)
        deadline = anyio.current_time() + self.timeout
        last: BaseException | None = None
        sent = False
        backoff = 0.02
        n = len(self.endpoints)
        while True:
            for k, i in enumerate(self._order()):
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    break
                # A hung member must leave time for another: an idempotent attempt gets
                # half the remaining time while other endpoints are left to try this round.
                budget = remaining / 2 if idempotent and k < n - 1 else remaining
                try:
                    with anyio.fail_after(budget):
                        resp = await self._http.post(self.endpoints[i] + path, content=payload)
                except _NOT_SENT as exc:
                    last = exc
                    self._failed(i)
                    continue
                except (httpx.TransportError, TimeoutError) as exc:
                    last = exc
                    self._failed(i)
                    sent = True
                    if not idempotent:
                        raise self._unavailable(path, exc, ambiguous=True) from exc
                    continue
                if resp.status_code == 200:
                    self._current = i
                    return resp.content
                err = _error_from_body(resp.status_code, resp.content)
                if isinstance(err, EtcdUnavailable) and (idempotent or _rejected_before_apply(err)):
                    last = err
                    self._failed(i)
                    continue
                if isinstance(err, EtcdUnavailable) and not idempotent:
                    err.ambiguous = True
                raise err
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise self._unavailable(path, last, ambiguous=sent and not idempotent)
            await anyio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 0.25)

    def _unavailable(
        self, path: str, last: BaseException | None, *, ambiguous: bool
    ) -> EtcdUnavailable:
        why = f"{type(last).__name__}: {last}" if last is not None else "no attempt"
        return EtcdUnavailable(
            f"etcd {path}: no endpoint of {self.endpoints} answered within "
            f"{self.timeout}s (last: {why})",
            ambiguous=ambiguous,
        )

    # -- kv ---------------------------------------------------------------------------

    async def range(
        self,
        key: Bytesish,
        range_end: bytes = b"",
        *,
        revision: int = 0,
        limit: int = 0,
        serializable: bool = False,
    ) -> tuple[RangeResult, int]:
        """One raw ``/v3/kv/range`` call: (result, header revision)."""
        body: dict[str, Any] = {"key": _b(key)}
        if range_end:
            body["range_end"] = range_end
        if revision:
            body["revision"] = str(revision)
        if limit:
            body["limit"] = str(limit)
        if serializable:
            body["serializable"] = True
        r = _range_dec.decode(await self._call("/v3/kv/range", body, idempotent=True))
        return RangeResult(r.kvs, r.more, r.count), r.header.revision

    async def get(self, key: Bytesish, *, serializable: bool = False) -> KeyValue | None:
        """The key's current state, or None. Linearizable unless ``serializable``."""
        res, _ = await self.range(key, serializable=serializable)
        return res.kvs[0] if res.kvs else None

    async def get_prefix(
        self, prefix: Bytesish, *, page_size: int = 1000, serializable: bool = False
    ) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted by key) and the revision they were read at.

        Read in pages of ``page_size`` all at the first page's revision, so the listing is
        one consistent snapshot (``EtcdCompacted`` if that revision is compacted meanwhile).
        """
        start = _b(prefix)
        end = prefix_range_end(prefix)
        out: list[KeyValue] = []
        revision = 0
        while True:
            res, header_rev = await self.range(
                start, end, revision=revision, limit=page_size, serializable=serializable
            )
            if not revision:
                revision = header_rev
            out.extend(res.kvs)
            if not res.more or not res.kvs:
                return out, revision
            start = res.kvs[-1].key + b"\0"

    async def put(self, key: Bytesish, value: Bytesish, lease: int | None = None) -> int:
        """Write ``key``; the revision of the write. ``EtcdLeaseNotFound`` for a gone lease."""
        body: dict[str, Any] = {"key": _b(key), "value": _b(value)}
        if lease:
            body["lease"] = str(lease)
        return _put_dec.decode(
            await self._call("/v3/kv/put", body, idempotent=True)
        ).header.revision

    async def delete(self, key: Bytesish) -> int:
        """Delete ``key``; how many keys were deleted (0 or 1)."""
        body = {"key": _b(key)}
        return _delete_dec.decode(
            await self._call("/v3/kv/deleterange", body, idempotent=True)
        ).deleted

    async def delete_prefix(self, prefix: Bytesish) -> int:
        """Delete every key under ``prefix``; how many were deleted."""
        body = {"key": _b(prefix), "range_end": prefix_range_end(prefix)}
        return _delete_dec.decode(
            await self._call("/v3/kv/deleterange", body, idempotent=True)
        ).deleted

    async def txn(
        self, compare: list[Compare], success: list[Op], failure: list[Op] | None = None
    ) -> TxnResult:
        """If every ``compare`` holds run ``success``, else ``failure``, atomically.

        Create-if-absent bound to a lease::

            await client.txn([Compare.create_revision(k, "==", 0)], [Op.put(k, v, lease=lid)])

        A fenced write (only while ``owner`` is still the key created at revision n)::

            await client.txn([Compare.create_revision(owner, "==", n)], [Op.put(k, state)])
        """
        body = {
            "compare": [c.to_json() for c in compare],
            "success": [o.to_json() for o in success],
            "failure": [o.to_json() for o in failure or []],
        }
        r = _txn_dec.decode(await self._call("/v3/kv/txn", body, idempotent=False))
        responses: list[RangeResult | PutResult | DeleteResult] = []
        for op in r.responses:
            if op.response_range is not None:
                rr = op.response_range
                responses.append(RangeResult(rr.kvs, rr.more, rr.count))
            elif op.response_put is not None:
                responses.append(
                    PutResult(op.response_put.header.revision, op.response_put.prev_kv)
                )
            elif op.response_delete_range is not None:
                d = op.response_delete_range
                responses.append(DeleteResult(d.deleted, d.prev_kvs))
        return TxnResult(r.succeeded, r.header.revision, responses)

    async def compact(self, revision: int) -> None:
        """Compact the history up to ``revision`` (tests use it to provoke re-lists)."""
        await self._call("/v3/kv/compaction", {"revision": str(revision)}, idempotent=True)

    # -- leases ---------------------------------------------------------------------

    async def _grant(self, ttl: int) -> tuple[int, int]:
        r = _grant_dec.decode(
            await self._call("/v3/lease/grant", {"TTL": str(ttl)}, idempotent=False)
        )
        if r.error:
            raise EtcdError(r.error)
        return r.ID, r.TTL

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd raises it to its minimum, 1.5 election
        timeouts rounded up); its id."""
        lease_id, _ = await self._grant(ttl)
        return lease_id

    async def keepalive_once(self, lease_id: int) -> int:
        """Renew the lease once; its TTL in seconds, counted from when the leader got this.

        ``EtcdLeaseNotFound`` when the lease is gone (expired or revoked).
        """
        body = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)}, idempotent=True)
        line = _keepalive_dec.decode(body.strip().split(b"\n", 1)[0])
        if line.error is not None:
            raise _error(0, line.error.grpc_code, line.error.message)
        if line.result is None or line.result.TTL <= 0:
            raise EtcdLeaseNotFound(f"lease {lease_id:x} not found", code=5)
        return line.result.TTL

    async def ttl(self, lease_id: int, *, keys: bool = False) -> LeaseInfo:
        """The lease's remaining TTL (and its keys with ``keys``); ``EtcdLeaseNotFound``."""
        body: dict[str, Any] = {"ID": str(lease_id)}
        if keys:
            body["keys"] = True
        r = _ttl_dec.decode(await self._call("/v3/lease/timetolive", body, idempotent=True))
        if r.TTL < 0:
            raise EtcdLeaseNotFound(f"lease {lease_id:x} not found", code=5)
        return LeaseInfo(r.ID, r.TTL, r.grantedTTL, r.keys)

    async def revoke(self, lease_id: int) -> bool:
        """Revoke the lease, deleting its keys; False if it was already gone."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)}, idempotent=True)
        except EtcdLeaseNotFound:
            return False
        return True

    # -- watch ---------------------------------------------------------------------

    def watch(
        self,
        key: Bytesish,
        *,
        prefix: bool = True,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress_notify: bool = False,
    ) -> Watch:
        """Watch ``key`` (a prefix unless ``prefix=False``) from ``start_revision`` (0: from
        now). See ``Watch``; use ``async with client.watch(...) as w: async for ev in w``.
        """
        return Watch(
            self,
            _b(key),
            prefix_range_end(key) if prefix else b"",
            start_revision=start_revision,
            prev_kv=prev_kv,
            progress_notify=progress_notify,
        )


# -- watch -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A PUT (``kv`` is the new state) or a DELETE (``kv`` has the key and the deleting
    ``mod_revision``); ``prev_kv`` is the state before, when the watch asked for it."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """The events of one watch response; ``revision`` is the store revision it was sent
    at (a progress notification has no events)."""

    revision: int
    events: list[WatchEvent]


class Watch:
    """A watch that resumes on another endpoint after its member dies or loses its leader.

    Iterate for ``WatchEvent``s, or ``batches()`` for ``WatchBatch``es. It resumes from
    the revision after the last event it delivered, so nothing is lost nor repeated.
    Raises ``EtcdCompacted`` when the revision to resume from is compacted (re-list),
    ``EtcdUnavailable`` when no endpoint accepts the watch within the client's timeout.
    ``next_revision`` is the revision it would resume from.

    A member that is alive but hung (SIGSTOP, a partition that keeps the TCP connection)
    leaves the watch silent; ``progress_notify`` asks etcd for empty batches every
    ``--experimental-watch-progress-notify-interval`` (10 min by default) to tell that apart.

    Use it as an async context manager (``async with client.watch(...) as w``) so its
    HTTP stream is closed as soon as you stop, on asyncio and trio alike.
    """

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        range_end: bytes,
        *,
        start_revision: int,
        prev_kv: bool,
        progress_notify: bool,
    ) -> None:
        self._client = client
        self.key = key
        self.range_end = range_end
        self.next_revision = start_revision
        self._prev_kv = prev_kv
        self._progress_notify = progress_notify
        self._gen: Any = None
        self._buffer: deque[WatchEvent] = deque()
        self.reconnects = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._gen is not None:
            await self._gen.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._buffer:
            if self._gen is None:
                self._gen = self._run()
            batch = await self._gen.__anext__()
            self._buffer.extend(batch.events)
        return self._buffer.popleft()

    def batches(self) -> AsyncIterator[WatchBatch]:
        """The responses, one ``WatchBatch`` each (progress notifications included)."""
        if self._gen is None:
            self._gen = self._run()
        gen: AsyncIterator[WatchBatch] = self._gen
        return gen

    def _request(self) -> bytes:
        create: dict[str, Any] = {"key": self.key}
        if self.range_end:
            create["range_end"] = self.range_end
        if self.next_revision:
            create["start_revision"] = str(self.next_revision)
        if self._prev_kv:
            create["prev_kv"] = True
        if self._progress_notify:
            create["progress_notify"] = True
        return _encode({"create_request": create})

    async def _run(self) -> AsyncIterator[WatchBatch]:
        client = self._client
        deadline: float | None = None  # set while no endpoint has the watch
        backoff = 0.02
        last: BaseException | None = None
        while True:
            for i in client._order():
                now = anyio.current_time()
                if deadline is None:
                    deadline = now + client.timeout
                if now >= deadline:
                    break
                try:
                    async with client._http.stream(
                        "POST",
                        client.endpoints[i] + "/v3/watch",
                        content=self._request(),
                        timeout=httpx.Timeout(None, connect=min(client.timeout / 2, 1.0)),
                    ) as resp:
                        lines = resp.aiter_lines()
                        first: bytes | None = None
                        with anyio.move_on_at(deadline):
                            if resp.status_code != 200:
                                raise _error_from_body(resp.status_code, await resp.aread())
                            first = (await anext(lines)).encode()
                        if first is None:
                            last = TimeoutError("watch not created in time")
                            client._failed(i)
                            continue
                        created = _watch_dec.decode(first)
                        if created.error is not None:
                            raise _error(0, created.error.grpc_code, created.error.message)
                        assert created.result is not None
                        self._check_canceled(created.result)
                        if not self.next_revision:
                            self.next_revision = created.result.header.revision + 1
                        client._current = i
                        deadline = None
                        backoff = 0.02
                        async for line in lines:
                            if not line.strip():
                                continue
                            msg = _watch_dec.decode(line)
                            if msg.error is not None:
                                raise _error(0, msg.error.grpc_code, msg.error.message)
                            r = msg.result
                            if r is None:
                                continue
                            self._check_canceled(r)
                            events = [
                                WatchEvent(
                                    "DELETE" if e.type == "DELETE" else "PUT", e.kv, e.prev_kv
                                )
                                for e in r.events
                            ]
                            if events:
                                self.next_revision = events[-1].kv.mod_revision + 1
                            yield WatchBatch(r.header.revision, events)
                        last = EOFError("watch stream ended")
                except (httpx.TransportError, msgspec.DecodeError, StopAsyncIteration) as exc:
                    last = exc
                except EtcdUnavailable as exc:
                    last = exc
                self.reconnects += 1
                client._failed(i)
            now = anyio.current_time()
            if deadline is not None and now >= deadline:
                raise client._unavailable("/v3/watch", last, ambiguous=False)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 0.25)

    def _check_canceled(self, r: _WatchResp) -> None:
        if not r.canceled:
            return
        if r.compact_revision:
            raise EtcdCompacted(
                f"watch from revision {self.next_revision}: compacted up to {r.compact_revision}",
                compact_revision=r.compact_revision,
            )
        raise EtcdError(f"watch canceled: {r.cancel_reason or 'no reason given'}")


# -- leases kept alive ---------------------------------------------------------------


class LeaseKeeper:
    """Keeps a lease alive and says, conservatively, until when it surely is.

    Renews every ``interval`` (ttl/3) after the last successful renewal, retrying on any
    endpoint until ``valid_until``. Times are ``anyio.current_time()`` (the event loop's
    monotonic clock):

    * ``last_renewed``: when the last successful renewal (or the grant) was *sent*. etcd's
      leader restarts the TTL when it gets the renewal, which is later, so the lease lives
      at least until ``last_renewed + ttl``.
    * ``valid_until``: ``last_renewed + ttl - safety_margin``.
    * ``lost``: set once it can no longer be sure the lease is alive: no renewal succeeded
      by ``valid_until``, or etcd said the lease is gone. Final: stop serving what the
      lease guards; take a new lease to come back. ``lost_reason`` says why, ``lost_at``
      when.

    Run ``run()`` in a task group, or use ``async with keeper:`` (which runs it and revokes
    the lease on exit). ``LeaseKeeper.grant(client, ttl)`` grants a lease and counts its
    validity from the grant's send time; a keeper built on an existing lease without
    ``granted_at`` is not valid until its first renewal, which ``run()`` sends at once.
    """

    def __init__(
        self,
        client: EtcdClient,
        lease_id: int,
        ttl: int,
        *,
        granted_at: float | None = None,
        safety_margin: float | None = None,
        interval: float | None = None,
    ) -> None:
        self.client = client
        self.lease_id = lease_id
        self.ttl = ttl
        self.safety_margin = max(0.1, ttl / 10) if safety_margin is None else safety_margin
        self.interval = ttl / 3 if interval is None else interval
        self.last_renewed = granted_at if granted_at is not None else -math.inf
        self.valid_until = (
            granted_at + ttl - self.safety_margin if granted_at is not None else -math.inf
        )
        self.lost = anyio.Event()
        self.lost_reason = ""
        self.lost_at: float | None = None
        self.last_error: BaseException | None = None
        self.renewals = 0
        self._tg: anyio.abc.TaskGroup | None = None

    @classmethod
    async def grant(cls, client: EtcdClient, ttl: int, **kwargs: Any) -> LeaseKeeper:
        """Grant a lease of ``ttl`` seconds and a keeper for it (not yet running)."""
        sent = anyio.current_time()
        lease_id, granted = await client._grant(ttl)
        return cls(client, lease_id, granted, granted_at=sent, **kwargs)

    @property
    def alive(self) -> bool:
        """Not lost, and ``valid_until`` not passed."""
        return not self.lost.is_set() and anyio.current_time() < self.valid_until

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost_at = anyio.current_time()
            self.lost.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew until the lease is lost (then return) or the task is cancelled."""
        task_status.started()
        if self.valid_until == -math.inf:
            # Validity unknown: the first renewal, sent at once, gets one client timeout.
            with anyio.move_on_after(self.client.timeout):
                await self._renew()
            if self.valid_until == -math.inf:
                self._lose(f"the first renewal did not succeed (last error: {self.last_error!r})")
        while not self.lost.is_set():
            await anyio.sleep_until(min(self.last_renewed + self.interval, self.valid_until))
            with anyio.move_on_at(self.valid_until):
                await self._renew()
                continue
            self._lose(f"no renewal succeeded before valid_until (last error: {self.last_error!r})")

    async def _renew(self) -> None:
        backoff = 0.05
        while True:
            sent = anyio.current_time()
            try:
                ttl = await self.client.keepalive_once(self.lease_id)
            except EtcdLeaseNotFound as exc:
                self.last_error = exc
                self._lose("etcd says the lease is gone")
                return
            except EtcdError as exc:
                self.last_error = exc
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, max(self.interval / 4, 0.05))
                continue
            self.renewals += 1
            self.last_renewed = sent
            self.valid_until = sent + ttl - self.safety_margin
            return

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        await self._tg.start(self.run)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(t, e, tb)
        finally:
            self._tg = None
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.client.timeout),
                contextlib.suppress(EtcdError),
            ):
                await self.client.revoke(self.lease_id)


# -- a cached prefix -------------------------------------------------------------------


class PrefixCache:
    """A live copy of every key under a prefix: list, then watch from the list's revision.

    ``items`` maps key -> ``KeyValue``; ``revision`` is the revision the copy is complete
    at; ``synced`` is true once it has listed and while its watch goes on (false while it
    re-lists after a compaction or after no endpoint would take its watch). Run ``run()``
    in a task group (``await tg.start(cache.run)`` returns once first synced); wait for a
    state with ``wait_for``.
    """

    def __init__(
        self, client: EtcdClient, prefix: Bytesish, *, retry_interval: float = 0.1
    ) -> None:
        self.client = client
        self.prefix = _b(prefix)
        self.retry_interval = retry_interval
        self._items: dict[bytes, KeyValue] = {}
        self.revision = 0
        self.synced = False
        self.relists = 0
        self.last_error: BaseException | None = None
        self._changed = anyio.Event()

    @property
    def items(self) -> Mapping[bytes, KeyValue]:
        return self._items

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """List and watch forever (until cancelled); re-list whenever the watch fails."""
        started = False
        while True:
            try:
                kvs, revision = await self.client.get_prefix(self.prefix)
            except EtcdError as exc:
                self.last_error = exc
                await anyio.sleep(self.retry_interval)
                continue
            self._items = {kv.key: kv for kv in kvs}
            self.revision = revision
            self.synced = True
            self.relists += 1
            self._notify()
            if not started:
                started = True
                task_status.started()
            try:
                async with self.client.watch(self.prefix, start_revision=revision + 1) as w:
                    async for batch in w.batches():
                        for ev in batch.events:
                            if ev.type == "PUT":
                                self._items[ev.kv.key] = ev.kv
                            else:
                                self._items.pop(ev.kv.key, None)
                        self.revision = (
                            batch.events[-1].kv.mod_revision if batch.events else batch.revision
                        )
                        self._notify()
            except EtcdError as exc:
                self.last_error = exc
            self.synced = False
            self._notify()
            await anyio.sleep(self.retry_interval)

    async def wait_for(
        self, predicate: Callable[[Mapping[bytes, KeyValue]], bool], timeout: float
    ) -> Mapping[bytes, KeyValue]:
        """Wait until synced and ``predicate(items)``; the items. ``TimeoutError`` after
        ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while True:
                changed = self._changed
                if self.synced and predicate(self._items):
                    return self._items
                await changed.wait()
