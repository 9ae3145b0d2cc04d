"""HMAC-SHA256 request signing: the one canonicalisation the client and server share.

A signed request carries four headers::

    Authorization: PPIO-HMAC-SHA256 Credential=<access_key>,
                   SignedHeaders=<h1;h2;...>, Signature=<hex>     (one line on the wire)
    X-PPIO-Date: <unix seconds>
    X-PPIO-Nonce: <16..64 chars of [A-Za-z0-9_-]>
    X-PPIO-Content-SHA256: <hex SHA-256 of the body>

The signature is ``hex(HMAC-SHA256(secret, string_to_sign))`` where::

    string_to_sign    = "PPIO-HMAC-SHA256" "\\n" timestamp "\\n" nonce "\\n"
                        hex(SHA-256(canonical_request))
    canonical_request = METHOD "\\n"             upper case
                        path "\\n"               as sent, no query ("/" if empty)
                        canonical_query "\\n"    see below
                        canonical_headers "\\n"  "name:value\\n" per signed header
                        signed_headers "\\n"     "h1;h2;..." lower case, sorted
                        body_sha256              hex SHA-256 of the body

so the headers block ends with an empty line, as in AWS SigV4.

- *canonical_query*: the query is split into ``key=value`` pairs (``+`` is a
  space, percent escapes are decoded to bytes), each key and value is
  re-encoded keeping only the RFC 3986 unreserved characters
  ``A-Z a-z 0-9 - . _ ~`` (so ``%20``, never ``+``), the encoded pairs are
  sorted by key then value and joined with ``&``. A key without ``=`` has an
  empty value.
- *path*: characters that may not appear in a path are percent-encoded
  (UTF-8); existing escapes and legal characters are kept as sent.
- *canonical headers*: names lower case; values trimmed, inner runs of spaces,
  tabs and line breaks collapsed to one space; repeated headers joined by
  ``,``. ``host``, ``x-ppio-date``, ``x-ppio-nonce`` and
  ``x-ppio-content-sha256`` are always signed, and ``content-type`` whenever
  the request has one.

The timestamp and nonce appear twice (as signed headers and in the string to
sign); the server rejects a timestamp outside its clock window and a nonce it
has seen, see :mod:`ppio_sandbox.orchestrator.auth`.

Example::

    >>> headers = {"Host": "api.example.com", "Content-Type": "application/json"}
    >>> added = sign_request("POST", "/v1/sessions", "b=2&a=1", headers, b'{"x":1}',
    ...                      access_key="ak1", secret="s3cret", timestamp=1700000000,
    ...                      nonce="abcdefghijklmnop")
    >>> print(added["Authorization"])  # doctest: +NORMALIZE_WHITESPACE
    PPIO-HMAC-SHA256 Credential=ak1,
    SignedHeaders=content-type;host;x-ppio-content-sha256;x-ppio-date;x-ppio-nonce,
    Signature=3e44e3ff7dc034e697bc64ba667eebff72d46443b940220e6e944fdf2dcf9012
    >>> verify_signature("POST", "/v1/sessions", "a=1&b=2", {**headers, **added}, b'{"x":1}',
    ...                  secret="s3cret").timestamp
    1700000000

Everything here is a pure function: no clock (unless no timestamp is given to
:func:`sign_request`), no I/O, no state.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes

from .errors import AuthenticationError

__all__ = [
    "ALGORITHM",
    "HEADER_CONTENT_SHA256",
    "HEADER_DATE",
    "HEADER_NONCE",
    "REQUIRED_SIGNED_HEADERS",
    "Authorization",
    "QueryLike",
    "SignedRequest",
    "body_sha256",
    "canonical_query",
    "canonical_request",
    "compute_signature",
    "parse_authorization",
    "sign_request",
    "string_to_sign",
    "verify_signature",
]

ALGORITHM = "PPIO-HMAC-SHA256"
HEADER_DATE = "X-PPIO-Date"
HEADER_NONCE = "X-PPIO-Nonce"
HEADER_CONTENT_SHA256 = "X-PPIO-Content-SHA256"
REQUIRED_SIGNED_HEADERS = frozenset(
    {"host", "x-ppio-date", "x-ppio-nonce", "x-ppio-content-sha256"}
)

QueryLike = (
    str | bytes | Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str | Sequence[str]]]
)
"""A query as sent (``"a=1&b=2"``, raw bytes) or as data (a mapping, or pairs)."""

# Characters legal in a path besides the unreserved ones `quote` always keeps.
_PATH_SAFE = "/%!$&'()*+,;=:@"
_WS_RUN = re.compile(r"[ \t\r\n]+")
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # an HTTP header name (lower case)


class Authorization(NamedTuple):
    """The parts of a ``PPIO-HMAC-SHA256`` Authorization header."""

    access_key: str
    signed_headers: tuple[str, ...]
    signature: str


class SignedRequest(NamedTuple):
    """What :func:`verify_signature` vouches for once the signature matches."""

    access_key: str
    timestamp: int
    nonce: str


def body_sha256(body: bytes) -> str:
    """Hex SHA-256 of ``body`` (the value of ``X-PPIO-Content-SHA256``)."""
    return hashlib.sha256(body).hexdigest()


def _requote(part: bytes) -> str:
    """Decode a form-encoded query component, then encode it canonically."""
    return quote_from_bytes(unquote_to_bytes(part.replace(b"+", b" ")), safe="")


def canonical_query(query: QueryLike) -> str:
    """Pairs re-encoded (unreserved characters kept), sorted by key then value, joined by ``&``.

    >>> canonical_query("b=2&a=x+y&a=%41&c")
    'a=A&a=x%20y&b=2&c='
    >>> canonical_query({"q": ["z", "a b"], "k": "/"})
    'k=%2F&q=a%20b&q=z'
    """
    pairs: list[tuple[str, str]] = []
    if isinstance(query, (str, bytes)):
        raw = query.encode("utf-8") if isinstance(query, str) else query
        for segment in raw.split(b"&"):
            if not segment:
                continue
            raw_key, _, raw_value = segment.partition(b"=")
            pairs.append((_requote(raw_key), _requote(raw_value)))
    else:
        items: Iterable[tuple[str, str | Sequence[str]]] = (
            query.items() if isinstance(query, Mapping) else query
        )
        for key, values in items:
            for value in (values,) if isinstance(values, str) else values:
                pairs.append((quote(key, safe=""), quote(value, safe="")))
    pairs.sort()
    return "&".join(f"{k}={v}" for k, v in pairs)


def _canonical_path(url_path: str | bytes) -> str:
    if isinstance(url_path, bytes):
        path = quote_from_bytes(url_path, safe=_PATH_SAFE)
    else:
        path = quote(url_path, safe=_PATH_SAFE)
    return path or "/"


def _header_value(value: str) -> str:
    return _WS_RUN.sub(" ", value).strip(" ")


def _lower_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names; repeated headers joined by ``,`` (as HTTP allows)."""
    out: dict[str, str] = {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        key = name.lower()
        value = _header_value(value)
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def canonical_request(
    method: str,
    url_path: str | bytes,
    query: QueryLike,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    signed_headers: Iterable[str],
    content_sha256: str,
) -> str:
    """The canonical form of a request (see the module docstring).

    ``signed_headers`` are the names to include (any case, any order); a
    signed header absent from ``headers`` is signed with an empty value.
    """
    lowered = _lower_headers(headers)
    names = sorted({name.lower() for name in signed_headers})
    header_lines = "".join(f"{name}:{lowered.get(name, '')}\n" for name in names)
    return "\n".join(
        (
            method.upper(),
            _canonical_path(url_path),
            canonical_query(query),
            header_lines,
            ";".join(names),
            content_sha256,
        )
    )


def string_to_sign(timestamp: int | str, nonce: str, canonical: str) -> str:
    """``ALGORITHM \\n timestamp \\n nonce \\n hex(SHA-256(canonical))``."""
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{nonce}\n{digest}"


def compute_signature(secret: str, to_sign: str) -> str:
    """Hex HMAC-SHA256 of the string to sign, keyed by the secret."""
    return hmac.new(secret.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_request(
    method: str,
    url_path: str,
    query: QueryLike,
    headers: Mapping[str, str],
    body: bytes,
    *,
    access_key: str,
    secret: str,
    timestamp: int | None = None,
    nonce: str | None = None,
    extra_signed_headers: Iterable[str] = (),
) -> dict[str, str]:
    """The headers to add to a request so the orchestrator accepts it.

    ``headers`` must hold ``Host`` exactly as it will be sent (with a
    non-default port); ``Content-Type`` is signed when present, and so is
    every name in ``extra_signed_headers``. ``query`` must match what is sent:
    the query string itself, or the mapping/pairs the HTTP client encodes.
    Returns ``Authorization``, ``X-PPIO-Date``, ``X-PPIO-Nonce`` and
    ``X-PPIO-Content-SHA256``; a fresh nonce and the current time are used
    unless given.
    """
    if "?" in url_path:
        raise ValueError("url_path must not contain the query; pass it as `query`")
    lowered = _lower_headers(headers)
    if "host" not in lowered:
        raise ValueError("headers must include Host, as it will be sent")
    if not access_key or any(c in access_key for c in ", \t="):
        raise ValueError("access_key must be non-empty without spaces, ',' or '='")
    ts = int(time.time()) if timestamp is None else int(timestamp)
    nonce = secrets.token_urlsafe(24) if nonce is None else nonce
    if not _NONCE.fullmatch(nonce):
        raise ValueError("nonce must be 16..64 characters of [A-Za-z0-9_-]")
    content_sha256 = body_sha256(body)
    added = {
        HEADER_DATE: str(ts),
        HEADER_NONCE: nonce,
        HEADER_CONTENT_SHA256: content_sha256,
    }
    names = set(REQUIRED_SIGNED_HEADERS) | {n.lower() for n in extra_signed_headers}
    if "content-type" in lowered:
        names.add("content-type")
    signed = sorted(names)
    lowered.update({name.lower(): value for name, value in added.items()})
    canonical = canonical_request(
        method, url_path, query, lowered, signed_headers=signed, content_sha256=content_sha256
    )
    signature = compute_signature(secret, string_to_sign(ts, nonce, canonical))
    added["Authorization"] = (
        f"{ALGORITHM} Credential={access_key}, SignedHeaders={';'.join(signed)}, "
        f"Signature={signature}"
    )
    return added


def parse_authorization(value: str) -> Authorization:
    """Split a ``PPIO-HMAC-SHA256`` Authorization header into its three parts.

    Raises :class:`AuthenticationError` saying what is malformed.
    """
    scheme, _, rest = value.strip().partition(" ")
    if scheme != ALGORITHM:
        raise AuthenticationError(f"authorization scheme must be {ALGORITHM}, got {scheme!r}")
    params: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, param = part.strip().partition("=")
        if not eq:
            raise AuthenticationError(
                f"malformed {ALGORITHM} authorization: expected name=value, got {name[:32]!r}"
            )
        if name in params:
            raise AuthenticationError(f"malformed {ALGORITHM} authorization: {name} given twice")
        params[name] = param.strip()
    expected = {"Credential", "SignedHeaders", "Signature"}
    if set(params) != expected:
        missing = sorted(expected - set(params))
        extra = sorted(set(params) - expected)
        raise AuthenticationError(
            f"malformed {ALGORITHM} authorization: missing {missing or 'nothing'}, "
            f"unexpected {extra or 'nothing'}"
        )
    access_key = params["Credential"]
    if not access_key:
        raise AuthenticationError("malformed authorization: empty Credential")
    names = [name.lower() for name in params["SignedHeaders"].split(";")]
    if not all(_TOKEN.fullmatch(name) for name in names):
        raise AuthenticationError("malformed authorization: SignedHeaders is not h1;h2;...")
    if len(set(names)) != len(names):
        raise AuthenticationError("malformed authorization: SignedHeaders repeats a header")
    signature = params["Signature"].lower()
    if not _HEX64.fullmatch(signature):
        raise AuthenticationError("malformed authorization: Signature must be 64 hex digits")
    return Authorization(access_key, tuple(sorted(names)), signature)


def verify_signature(
    method: str,
    url_path: str | bytes,
    query: QueryLike,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes,
    *,
    secret: str,
    authorization: Authorization | None = None,
) -> SignedRequest:
    """Check a signed request against ``secret``; return its key, timestamp and nonce.

    ``url_path`` is the path as received (ASGI ``raw_path`` is best), and
    ``query`` the raw query string. ``authorization`` may be passed when
    already parsed (to look the secret up). The clock window and the nonce
    cache are the caller's job. Raises :class:`AuthenticationError` naming
    the first problem found; the comparison is constant-time.
    """
    lowered = _lower_headers(headers)
    if authorization is None:
        authorization = parse_authorization(lowered.get("authorization", ""))
    signed = authorization.signed_headers
    required = set(REQUIRED_SIGNED_HEADERS)
    if "content-type" in lowered:
        required.add("content-type")
    if unsigned := sorted(required - set(signed)):
        raise AuthenticationError(f"these headers must be signed: {', '.join(unsigned)}")
    if absent := [name for name in signed if name not in lowered]:
        raise AuthenticationError(f"signed headers missing from the request: {', '.join(absent)}")
    raw_ts = lowered["x-ppio-date"]
    if not (raw_ts.isascii() and raw_ts.isdigit() and len(raw_ts) <= 12):
        raise AuthenticationError(f"{HEADER_DATE} must be unix seconds, got {raw_ts[:32]!r}")
    nonce = lowered["x-ppio-nonce"]
    if not _NONCE.fullmatch(nonce):
        raise AuthenticationError(f"{HEADER_NONCE} must be 16..64 characters of [A-Za-z0-9_-]")
    content_sha256 = body_sha256(body)
    sent_sha256 = lowered["x-ppio-content-sha256"].lower().encode("utf-8", "replace")
    if not hmac.compare_digest(sent_sha256, content_sha256.encode("ascii")):
        raise AuthenticationError(f"{HEADER_CONTENT_SHA256} does not match the body's SHA-256")
    canonical = canonical_request(
        method, url_path, query, lowered, signed_headers=signed, content_sha256=content_sha256
    )
    to_sign = string_to_sign(raw_ts, nonce, canonical)
    expected = compute_signature(secret, to_sign)
    if not hmac.compare_digest(expected, authorization.signature):
        raise AuthenticationError(
            f"signature does not match for key {authorization.access_key!r}: check the secret "
            "and that method, path, query, signed headers and body are signed as sent",
            details={"string_to_sign": to_sign},
        )
    return SignedRequest(authorization.access_key, int(raw_ts), nonce)
