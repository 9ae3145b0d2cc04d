"""Who is calling: API keys, tenants, and the two ways to prove a key.

Every key belongs to a tenant, and a tenant may hold several keys at once so
secrets can be rotated without downtime. A request proves a key either way:

- ``Authorization: Bearer <secret>`` -- the token is the key's secret. It is
  found through a dict keyed by the SHA-256 of each secret (so the lookup
  time says nothing about the secret) and confirmed with
  :func:`hmac.compare_digest`.
- ``Authorization: PPIO-HMAC-SHA256 Credential=<key_id>, ...`` -- a request
  signed as :mod:`ppio_sandbox.agent_runtime.signing` describes. The server
  checks the signature (constant time), then that ``X-PPIO-Date`` is within
  ``window`` seconds of its clock (inclusive, both directions), then that the
  nonce was not seen before.

Replay protection. A signed request stamped ``t`` passes the clock check only
while ``now <= t + window``; after that the timestamp check rejects any replay
by itself. The nonce cache covers the time before: each nonce is remembered
until ``max(seen + nonce_ttl, t + window)``, so protection is complete even
for a request stamped ``window`` seconds in the future (with the default
``nonce_ttl = 2 * window`` the first term already covers it). The cache is
bounded by ``max_nonces``, evicting the oldest entries first; only requests
with a valid signature reach it, so an anonymous flood cannot flush it.

With no keys configured, authentication is off and every request is
``Principal("default", None)``; ``serve`` then binds loopback only.

>>> ring = KeyRing.from_specs(["acme:k1:s3cret-one", "acme:k2:s3cret-two"])
>>> auth = Authenticator(ring)
>>> auth.authenticate("GET", "/v1/sessions", b"", [(b"authorization", b"Bearer s3cret-two")], b"")
Principal(tenant='acme', key_id='k2')
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ppio_sandbox.agent_runtime.errors import AuthenticationError
from ppio_sandbox.agent_runtime.signing import ALGORITHM, parse_authorization, verify_signature

__all__ = [
    "DEFAULT_TENANT",
    "KEYS_ENV_VAR",
    "ApiKey",
    "Authenticator",
    "KeyRing",
    "Principal",
    "parse_key_spec",
]

DEFAULT_TENANT = "default"
KEYS_ENV_VAR = "PPIO_ORCHESTRATOR_KEYS"
_FORBIDDEN_IN_NAMES = frozenset(" \t\r\n,=:;\"'")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One credential: ``key_id`` is public (the HMAC Credential), ``secret`` is not."""

    key_id: str
    secret: str = field(repr=False)
    tenant: str = DEFAULT_TENANT

    def __post_init__(self) -> None:
        for what, value in (("key_id", self.key_id), ("tenant", self.tenant)):
            if not value or any(c in _FORBIDDEN_IN_NAMES for c in value):
                raise ValueError(f"{what} must be non-empty without spaces or ,=:;\"'")
        if not self.secret or any(c.isspace() or c == "," for c in self.secret):
            raise ValueError(f"the secret of key {self.key_id!r} is empty or has spaces or ','")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: its tenant, and the key it used (None with auth off)."""

    tenant: str
    key_id: str | None


def parse_key_spec(spec: str) -> ApiKey:
    """Parse ``tenant:key_id:secret``, or ``key_id:secret`` for the default tenant.

    With three or more parts the secret is everything after the second colon,
    so a secret containing ``:`` needs the tenant form. Errors never quote the
    spec, since it holds the secret.
    """
    parts = spec.strip().split(":", 2)
    if len(parts) == 2:
        return ApiKey(parts[0], parts[1])
    if len(parts) == 3:
        return ApiKey(parts[1], parts[2], parts[0])
    raise ValueError("expected tenant:key_id:secret or key_id:secret")


class KeyRing:
    """The API keys the orchestrator accepts, by key id and by secret digest.

    Key ids are unique across tenants (they name the key in HMAC requests),
    and so are secrets (a Bearer token must name one key).
    """

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_id: dict[str, ApiKey] = {}
        self._by_digest: dict[bytes, ApiKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: ApiKey) -> None:
        """Add a key; a repeated key id or secret is a ``ValueError``."""
        if key.key_id in self._by_id:
            raise ValueError(f"duplicate key id {key.key_id!r}")
        digest = hashlib.sha256(key.secret.encode("utf-8")).digest()
        if digest in self._by_digest:
            raise ValueError(f"key {key.key_id!r} reuses the secret of another key")
        self._by_id[key.key_id] = key
        self._by_digest[digest] = key

    @property
    def empty(self) -> bool:
        """True when no key is configured (authentication is off)."""
        return not self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self._by_id.values())

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, or None."""
        return self._by_id.get(key_id)

    def find_by_secret(self, token: str) -> ApiKey | None:
        """The key whose secret is ``token``, or None, in time independent of the secrets."""
        raw = token.encode("utf-8", "surrogateescape")
        key = self._by_digest.get(hashlib.sha256(raw).digest())
        if key is None or not hmac.compare_digest(key.secret.encode("utf-8"), raw):
            return None
        return key

    def tenants(self) -> set[str]:
        """Every tenant that holds at least one key."""
        return {key.tenant for key in self._by_id.values()}

    @classmethod
    def from_specs(cls, specs: Iterable[str], *, source: str = "key") -> KeyRing:
        """Keys from ``tenant:key_id:secret`` strings (e.g. repeated ``--api-key``)."""
        ring = cls()
        ring._add_specs(specs, source)
        return ring

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KeyRing:
        """Keys from ``PPIO_ORCHESTRATOR_KEYS``: comma-separated specs."""
        ring = cls()
        ring._add_env(os.environ if environ is None else environ)
        return ring

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyRing:
        """Keys from a file: JSON ``{"keys": [{"tenant", "key_id", "secret"}]}``, or
        one ``tenant:key_id:secret`` per line with ``#`` comments and blank lines."""
        ring = cls()
        ring._add_file(Path(path))
        return ring

    @classmethod
    def load(
        cls,
        specs: Iterable[str] = (),
        *,
        environ: Mapping[str, str] | None = None,
        files: Iterable[str | os.PathLike[str]] = (),
    ) -> KeyRing:
        """All sources together: CLI specs, the environment variable, key files.

        ``environ=None`` reads ``os.environ``; pass ``{}`` to ignore it.
        """
        ring = cls()
        ring._add_specs(specs, "key")
        ring._add_env(os.environ if environ is None else environ)
        for path in files:
            ring._add_file(Path(path))
        return ring

    def _add_specs(self, specs: Iterable[str], source: str) -> None:
        for n, spec in enumerate(specs, 1):
            self._add_spec(spec, f"{source} #{n}")

    def _add_spec(self, spec: str, where: str) -> None:
        try:
            self.add(parse_key_spec(spec))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def _add_env(self, environ: Mapping[str, str]) -> None:
        value = environ.get(KEYS_ENV_VAR, "")
        self._add_specs((s for s in value.split(",") if s.strip()), KEYS_ENV_VAR)

    def _add_file(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("{"):
            self._add_json(text, path)
            return
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                self._add_spec(line, f"{path} line {n}")

    def _add_json(self, text: str, path: Path) -> None:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        entries = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f'{path}: expected {{"keys": [...]}}')
        for n, entry in enumerate(entries):
            fields = entry if isinstance(entry, dict) else {}
            values = [
                fields.get("key_id"),
                fields.get("secret"),
                fields.get("tenant", DEFAULT_TENANT),
            ]
            if not all(isinstance(v, str) for v in values):
                raise ValueError(f"{path}: keys[{n}] needs string key_id, secret, tenant")
            try:
                self.add(ApiKey(*values))
            except ValueError as exc:
                raise ValueError(f"{path}: keys[{n}]: {exc}") from None


def _seconds(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


class _NonceCache:
    """Nonces seen recently, each with the time it may be forgotten; bounded."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        # Insertion-ordered, so the first entry is the oldest.
        self._expiry: dict[tuple[str, str], float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, key: tuple[str, str], now: float, expires: float) -> bool:
        """Record ``key``; False if it is recorded and ``now`` is not past its expiry."""
        seen = self._expiry.get(key)
        if seen is not None:
            if now <= seen:  # inclusive, like the clock window
                return False
            del self._expiry[key]  # expired: re-added below as the newest
        self._prune(now)
        while len(self._expiry) >= self._max:
            del self._expiry[next(iter(self._expiry))]
        self._expiry[key] = expires
        return True

    def _prune(self, now: float) -> None:
        # Amortised O(1): drop expired entries from the old end only.
        while self._expiry:
            oldest = next(iter(self._expiry))
            if now <= self._expiry[oldest]:
                return
            del self._expiry[oldest]


class Authenticator:
    """Turn a request's credentials into a :class:`Principal`, or raise 401.

    ``clock`` returns unix seconds (injected in tests). ``window`` is the
    allowed clock skew in seconds, inclusive; ``nonce_ttl`` how long a nonce
    is remembered at least; ``max_nonces`` bounds that memory.
    """

    def __init__(
        self,
        keyring: KeyRing,
        *,
        clock: Callable[[], float] = time.time,
        window: float = 300,
        nonce_ttl: float = 600,
        max_nonces: int = 100_000,
    ) -> None:
        if window <= 0 or nonce_ttl <= 0 or max_nonces <= 0:
            raise ValueError("window, nonce_ttl and max_nonces must be positive")
        self.keyring = keyring
        self._clock = clock
        self._window = window
        self._nonce_ttl = nonce_ttl
        self._nonces = _NonceCache(max_nonces)

    @property
    def enabled(self) -> bool:
        """False when the key ring is empty: every request is the default tenant."""
        return not self.keyring.empty

    def authenticate(
        self,
        method: str,
        path: str | bytes,
        query_string: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> Principal:
        """Authenticate one request given in ASGI terms.

        ``path`` is best the ASGI ``raw_path`` (the path as sent), else
        ``path``; ``headers`` are the ASGI raw header pairs. Raises
        :class:`AuthenticationError` saying what is wrong.
        """
        if self.keyring.empty:
            return Principal(DEFAULT_TENANT, None)
        decoded = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        values = [value for name, value in decoded if name.lower() == "authorization"]
        if not values:
            raise AuthenticationError(
                f"missing credentials: send 'Authorization: Bearer <api key>' or a {ALGORITHM} "
                "signature"
            )
        if len(values) > 1:
            raise AuthenticationError("more than one Authorization header")
        scheme, _, credentials = values[0].strip().partition(" ")
        if scheme.lower() == "bearer":
            return self._bearer(credentials.strip())
        if scheme == ALGORITHM:
            return self._hmac(method, path, query_string, decoded, body, values[0])
        raise AuthenticationError(
            f"unsupported authorization scheme {scheme[:32]!r}: use Bearer or {ALGORITHM}"
        )

    def _bearer(self, token: str) -> Principal:
        if not token or " " in token:
            raise AuthenticationError("malformed Bearer credentials: expected 'Bearer <api key>'")
        key = self.keyring.find_by_secret(token)
        if key is None:
            raise AuthenticationError("unknown API key")
        return Principal(key.tenant, key.key_id)

    def _hmac(
        self,
        method: str,
        path: str | bytes,
        query_string: bytes,
        headers: list[tuple[str, str]],
        body: bytes,
        authorization: str,
    ) -> Principal:
        parsed = parse_authorization(authorization)
        key = self.keyring.get(parsed.access_key)
        if key is None:
            raise AuthenticationError(f"unknown access key {parsed.access_key[:64]!r}")
        signed = verify_signature(
            method, path, query_string, headers, body, secret=key.secret, authorization=parsed
        )
        now = self._clock()
        skew = signed.timestamp - now
        if abs(skew) > self._window:
            direction = "ahead of" if skew > 0 else "behind"
            raise AuthenticationError(
                f"request timestamp is {_seconds(abs(skew))} s {direction} the server clock, "
                f"beyond the {_seconds(self._window)} s window: check the client's clock"
            )
        expires = max(now + self._nonce_ttl, signed.timestamp + self._window)
        if not self._nonces.add((key.key_id, signed.nonce), now, expires):
            raise AuthenticationError("nonce already used: a signed request cannot be replayed")
        return Principal(key.tenant, key.key_id)
