"""Hypothesis strategies for hostile requests to every ``/v1`` endpoint.

A :class:`Hostile` request is built from: a method (usually one the route
takes, so requests get past routing); a path whose ids are the tenant's own,
another tenant's, unknown, or mangled (percent-encoding, dot segments, very
long, unicode raw or escaped); headers with wrong values (Idempotency-Key,
X-PPIO-Strategy, Last-Event-ID, X-PPIO-Session-Id, Accept, Content-Type,
a Content-Length that lies, chunked bodies); and a body that is JSON or
msgpack of arbitrary nested values, an object of the fields the API reads
with values of every type, huge integers, NaN and infinities (msgpack), deep
nesting, invalid UTF-8, or garbage.

Every strategy is built once, at import: building them in each draw made
Hypothesis validate them again and again, which cost more than the requests.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import msgspec
from hypothesis import strategies as st

__all__ = ["IDS", "Hostile", "hostile_invocations", "hostile_requests", "mangled_paths"]


class Hostile:
    """One request as sent on the wire (see ``raw.build_request``).

    A plain class with a short ``repr``: Hypothesis prints falsifying
    examples with it, and bodies may be hundreds of kilobytes.
    """

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        content_type: bytes | None = b"application/json",
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers or []
        self.body = body
        self.content_type = content_type
        self.auth = "alpha"  # alpha | gamma (HMAC) | bad | none
        self.content_length: bool | int = True
        self.chunked = False
        self.half_close = False
        self.route = ""  # the route it was drawn for, for the figures

    def wire_valid(self) -> bool:
        """True unless the request line or a header is malformed HTTP/1.1."""
        fields = [value for _, value in self.headers]
        if self.content_type is not None:
            fields.append(self.content_type)
        return (
            _TARGET.fullmatch(self.target) is not None
            and self.method.isupper()
            and all(_FIELD_VALUE.fullmatch(value) for value in fields)
        )

    def sends_more_than_declared(self) -> bool:
        """True when bytes follow the declared body: they read as a second, malformed
        request on the same connection."""
        if self.chunked or self.content_length is True:
            return False
        declared = 0 if self.content_length is False else self.content_length
        return declared < len(self.body)

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 200 else self.body[:200] + b"...(%d)" % len(self.body)
        return (
            f"Hostile({self.method} {self.target[:300]!r} auth={self.auth} "
            f"ctype={self.content_type!r} headers={self.headers!r} body={body!r} "
            f"cl={self.content_length!r} chunked={self.chunked} half_close={self.half_close})"
        )


_TARGET = re.compile(rb"[\x21-\x7e]+")
_FIELD_VALUE = re.compile(rb"[\x20-\x7e\x80-\xff]*")

# Ids the server knows (the test sets them up): alpha's own sessions, beta's
# session and template, the shared template.
IDS = {
    "own_invoke": "fz",  # alpha's session for invocations (never paused)
    "own_life": "fz-life",  # alpha's session for pause/resume/timeout/delete
    "other_session": "bz",  # beta's session
    "other_template": "beta-tpl",  # beta's uploaded template (explicit id)
    "shared_template": "fuzz",
}

# -- values -------------------------------------------------------------------

BIG_INTS = [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**400, -(10**400)]

_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(BIG_INTS)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
_MSGPACK_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_MSGPACK_SCALARS = (
    st.none()
    | st.booleans()
    | _MSGPACK_INTS
    | st.floats()  # NaN and infinities included
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_MSGPACK_KEYS = (
    st.text(max_size=8)
    | _MSGPACK_INTS
    | st.binary(max_size=4)
    | st.none()
    | st.booleans()
    | st.floats()
)
MSGPACK_VALUES = st.recursive(
    _MSGPACK_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_MSGPACK_KEYS, inner, max_size=4),
    max_leaves=8,
)

# Hand-made msgpack that msgspec's encoder would never produce.
MSGPACK_ODDITIES = [
    b"\x81\x91\x01\x02",  # {[1]: 2}: an array as a key
    b"\x81\xc0\x02",  # {nil: 2}
    b"\x81\xc3\x02",  # {true: 2}
    b"\x82\xa6prompt\xa1x\xa4data\x81\xc0\x01",  # {"prompt": "x", "data": {nil: 1}}
    b"\x82\xabtemplate_id\xa4fuzz\xa8metadata\x81\x91\x01\x02",  # metadata {[1]: 2}
    b"\x82\xabtemplate_id\xa4fuzz\xa8metadata\x81\xa1c\xd4\x05\x01",  # metadata with an ext
    b"\x81\xa1c\xd4\x05\x01",  # an ext type 5 value
    b"\x81\xa1c\xd6\xff\x00\x00\x00\x01",  # a timestamp
    b"\x81\xa1c\xc7\x0c\xff" + b"\x00" * 12,  # a 96-bit timestamp
    b"\x81\xa1c\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
    b"\x82\xabtemplate_id\xa4fuzz\xaftimeout_seconds\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # inf
    b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion entries
    b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
    b"\xdb\xff\xff\xff\xff",  # a string claiming 4 GB
    b"\xc1",  # never used
    b"\x81\xa1x\xa2\xff\xfe",  # a str that is not UTF-8
]
JSON_ODDITIES = [
    b'{"prompt": "\xff\xfe"}',  # invalid UTF-8
    b'{"prompt": "\\ud800"}',  # a lone surrogate escape
    b'{"template_id": "fuzz", "timeout_seconds": 1' + b"0" * 400 + b"}",
    b'{"template_id": "fuzz", "metadata": {"n": 18446744073709551616}}',
    b'{"prompt": "x", "data": {"n": -9223372036854775809}}',
    b'{"template_id": "fuzz", "timeout_seconds": 1e999}',
    b'{"timeout_seconds": NaN}',
    b'{"a": 1, "a": 2}',
    b'"just a prompt"',
    b"\xef\xbb\xbf{}",  # a BOM
    b"{}" * 3,
    b'{"prompt": "x"} trailing',
]

# Fields the API reads, and values of every type for them.
FIELDS = ["template_id", "timeout_seconds", "session_id", "env_vars", "metadata", "prompt", "data"]
_SPECIAL_VALUES = st.sampled_from(
    [
        "fuzz",
        IDS["other_template"],
        "",
        "fz",
        "a/b",
        "x" * 200,
        -1,
        0,
        1e-300,
        1e300,
        True,
        [],
        {},
        {"A": "1"},
        {"PPIO_SESSION_ID": "x"},
        {"A": "\x00"},
        {"1A": "x"},
        {"A": 1},
    ]
)
_FIELD_NAMES = st.lists(st.sampled_from(FIELDS), unique=True, max_size=4)
_TEMPLATE_IDS = st.sampled_from(["fuzz", IDS["other_template"], "nope"])


def _objects(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[Any, Any]]:
    @st.composite
    def objects(draw: st.DrawFn) -> dict[Any, Any]:
        out: dict[Any, Any] = {name: draw(values) for name in draw(_FIELD_NAMES)}
        if draw(st.booleans()):
            out["template_id"] = draw(_TEMPLATE_IDS)
        return out

    return objects()


JSON_OBJECTS = _objects(JSON_VALUES | _SPECIAL_VALUES)
# Nearly right: what each route wants, so that requests get to the sessions.
FITTING = st.fixed_dictionaries(
    {"template_id": st.just("fuzz"), "timeout_seconds": st.floats(1, 3600)},
    optional={
        "prompt": st.text(max_size=20),
        "data": st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3),
        "metadata": st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3),
        "env_vars": st.dictionaries(
            st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), st.text(max_size=8), max_size=2
        ),
        "session_id": st.from_regex(r"[a-z0-9._:-]{1,12}", fullmatch=True),
    },
)
MSGPACK_OBJECTS = _objects(MSGPACK_VALUES | _SPECIAL_VALUES)


def _deep(depth: int, kind: str) -> bytes:
    if kind == "json-array":
        return b"[" * depth + b"]" * depth
    if kind == "json-object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "msgpack-array":
        return b"\x91" * depth + b"\x90"
    return b"\x81\xa1a" * depth + b"\x01"  # msgpack maps


_JSON_TYPES = (
    st.sampled_from(
        [b"application/json", b"application/json", b"application/json; charset=utf-8", b"x/y+json"]
    )
    | st.none()
)
_MSGPACK_TYPES = st.sampled_from(
    [b"application/msgpack", b"application/x-msgpack", b"application/vnd.msgpack"]
)
_DEEP = st.tuples(
    st.sampled_from(["json-array", "json-object", "msgpack-array", "msgpack-map"]),
    st.sampled_from([100, 1000, 10_000, 100_000]),
)
_ODDITIES = st.sampled_from(MSGPACK_ODDITIES + JSON_ODDITIES)
_ODD_TYPES = st.sampled_from(
    [
        b"application/json",
        b"application/msgpack",
        b"text/plain",
        b"application/gzip",
        b"multipart/form-data; boundary=x",
        b"application/x-www-form-urlencoded",
        b";;;",
        b"application/json; charset=latin-1",
        b"\xff\xfe",
    ]
) | st.binary(max_size=16).filter(lambda b: not (set(b) & {0, 10, 13}))
_BODY_KINDS = st.sampled_from(
    ["json", "json-object", "msgpack", "msgpack-object", "deep", "oddity", "raw", "empty"]
    + ["fitting"] * 4
)


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """``(body, content_type)``: JSON, msgpack, deep, broken, or no body at all."""
    kind = draw(_BODY_KINDS)
    if kind == "json":
        return msgspec.json.encode(draw(JSON_VALUES)), draw(_JSON_TYPES)
    if kind == "json-object":
        return msgspec.json.encode(draw(JSON_OBJECTS)), draw(_JSON_TYPES)
    if kind == "fitting":
        fitting = draw(FITTING)
        if draw(st.booleans()):
            try:
                return msgspec.msgpack.encode(fitting), draw(_MSGPACK_TYPES)
            except OverflowError:  # a huge integer: JSON only
                pass
        return msgspec.json.encode(fitting), b"application/json"
    if kind == "msgpack":
        return msgspec.msgpack.encode(draw(MSGPACK_VALUES)), draw(_MSGPACK_TYPES)
    if kind == "msgpack-object":
        return msgspec.msgpack.encode(draw(MSGPACK_OBJECTS)), draw(_MSGPACK_TYPES)
    if kind == "deep":
        shape, depth = draw(_DEEP)
        ctype = draw(_MSGPACK_TYPES if shape.startswith("msgpack") else _JSON_TYPES)
        return _deep(depth, shape), ctype
    if kind == "oddity":
        body = draw(_ODDITIES)
        return body, draw(_MSGPACK_TYPES if body in MSGPACK_ODDITIES else _JSON_TYPES)
    if kind == "raw":
        return draw(st.binary(max_size=64)), draw(_ODD_TYPES)
    return b"", draw(st.none() | st.just(b"application/json"))


BODIES = _bodies()

# -- paths ----------------------------------------------------------------------

_KNOWN = {
    "session": st.sampled_from([IDS["own_life"], IDS["other_session"], "nope"]),
    "invoke": st.sampled_from([IDS["own_invoke"], IDS["own_invoke"], IDS["other_session"], "nope"]),
    "template": st.sampled_from([IDS["shared_template"], IDS["other_template"], "nope"]),
}
_MANGLINGS = st.sampled_from(
    ["plain", "percent-all", "percent-utf8", "raw-utf8", "dots", "long", "slash"]
)
_DOTS = st.sampled_from([b".", b"..", b"%2e%2e", b"%2E", b"..%2f..", b"./x"])
_LONG = st.sampled_from([129, 1000, 8000])
_SLASHES = st.sampled_from([b"/", b"//", b"%2f", b"/x"])
_ID_CHOICE = st.sampled_from(["known", "known", "known", "mangled", "text"])
_ID_TEXT = st.text(min_size=1, max_size=12)


def _mangle(draw: st.DrawFn, value: str) -> bytes:
    how = draw(_MANGLINGS)
    if how == "percent-all":
        return "".join(f"%{b:02X}" for b in value.encode()).encode()
    if how == "percent-utf8":
        return quote(value, safe="").encode()
    if how == "raw-utf8":
        return value.encode("utf-8", "surrogatepass")
    if how == "dots":
        return draw(_DOTS)
    if how == "long":
        return b"a" * draw(_LONG)
    if how == "slash":
        return value.encode() + draw(_SLASHES)
    return quote(value, safe="-._~:@!$&'()*+,;=").encode()


def _id(draw: st.DrawFn, kind: str) -> bytes:
    """A path id: known ones, unknown ones, or a mangled one."""
    choice = draw(_ID_CHOICE)
    if choice == "known":
        return str(draw(_KNOWN[kind])).encode()
    if choice == "mangled":
        return _mangle(draw, str(draw(_KNOWN[kind])))
    return _mangle(draw, draw(_ID_TEXT))


# (path, kind of id, methods the route takes)
ROUTES: list[tuple[str, str | None, tuple[str, ...]]] = [
    ("/v1/templates", None, ("GET", "POST")),
    ("/v1/templates/{}", "template", ("GET", "DELETE")),
    ("/v1/sessions", None, ("GET", "POST")),
    ("/v1/sessions/{}", "session", ("GET", "DELETE")),
    ("/v1/sessions/{}/pause", "session", ("POST",)),
    ("/v1/sessions/{}/resume", "session", ("POST",)),
    ("/v1/sessions/{}/timeout", "session", ("POST", "PUT")),
    ("/v1/sessions/{}/ping", "session", ("GET",)),
    ("/v1/sessions/{}/invocations", "invoke", ("POST",)),
    ("/v1/agents/{}/invocations", "template", ("POST",)),
]
# The invocation routes, the hot path with the most headers, three times as often.
_ROUTES = st.sampled_from(ROUTES + [r for r in ROUTES if r[0].endswith("/invocations")] * 2)
_NOISE = st.sampled_from([""] * 9 + ["query", "trailing", "double", "dots", "case", "percent"])
_QUERIES = st.sampled_from(
    [b"strategy=interrupt", b"strategy=%ff", b"strategy=reject", b"a=1&a=2", b"=", b"&&", b"%"]
)


@st.composite
def _routed_paths(draw: st.DrawFn) -> tuple[bytes, tuple[str, ...], str]:
    route, kind, methods = draw(_ROUTES)
    path = route.encode()
    if kind is not None:
        path = path.replace(b"{}", _id(draw, kind))
    noise = draw(_NOISE)
    if noise == "query":
        path += b"?" + draw(_QUERIES)
    elif noise == "trailing":
        path += b"/"
    elif noise == "double":
        path = path.replace(b"/v1/", b"//v1//")
    elif noise == "dots":
        path = path.replace(b"/v1/", b"/v1/./x/../")
    elif noise == "case":
        path = path.upper()
    elif noise == "percent":
        path = path.replace(b"/v1/", b"/%76%31/")
    return path, methods, route


ROUTED_PATHS = _routed_paths()


def mangled_paths() -> st.SearchStrategy[bytes]:
    """A route's path with its id drawn by :func:`_id`, maybe with a query and noise."""
    return ROUTED_PATHS.map(lambda routed: routed[0])


# -- headers --------------------------------------------------------------------

_HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
).map(lambda s: s.encode("latin-1"))
_HEADER_VALUES: dict[bytes, st.SearchStrategy[bytes]] = {
    b"idempotency-key": _HEADER_TEXT,
    b"x-ppio-request-id": _HEADER_TEXT,
    b"x-ppio-strategy": st.sampled_from([b"enqueue", b"reject", b"interrupt", b"INTERRUPT"])
    | _HEADER_TEXT,
    b"last-event-id": st.integers(min_value=-5, max_value=10).map(lambda n: b"%d" % n)
    | st.sampled_from([b"1" * 400, b"-0", b"1e3", b" 1 ", b"0x10", b"\xd9\xa3"])
    | _HEADER_TEXT,
    b"accept": st.sampled_from(
        [b"application/msgpack", b"application/x-msgpack", b"text/event-stream", b"*/*"]
    )
    | _HEADER_TEXT,
    b"expect": st.sampled_from([b"100-continue", b"nonsense"]),
    b"connection": st.sampled_from([b"keep-alive", b"upgrade", b"close, te"]),
    b"x-ppio-session-id": st.sampled_from([b"fz", b"bz", b"a b", b"x" * 200]) | _HEADER_TEXT,
    b"x-amzn-bedrock-agentcore-runtime-session-id": st.sampled_from([b"fz", b"x" * 129])
    | _HEADER_TEXT,
}
_HEADER_NAMES = st.lists(st.sampled_from(sorted(_HEADER_VALUES)), max_size=4)
# Replies in msgpack carry less than JSON (no integers past 64 bits): ask for them often.
_ACCEPT = st.sampled_from([None, b"application/msgpack", b"application/msgpack", b"*/*"])
_JUNK_HEADER = st.tuples(
    st.sampled_from([b"x-junk", b"accept", b"idempotency-key"]),
    st.binary(max_size=12),  # may hold CR, LF, NUL: the parser's business
)


@st.composite
def _headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    out = [(name, draw(_HEADER_VALUES[name])) for name in draw(_HEADER_NAMES)]
    accept = draw(_ACCEPT)
    if accept is not None:
        out.append((b"accept", accept))
    if draw(st.integers(0, 19)) == 0:
        out.append(draw(_JUNK_HEADER))
    return out


HEADERS = _headers()

# -- requests -------------------------------------------------------------------

_ANY_METHOD = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "get"])
_AUTH = st.sampled_from(["alpha"] * 14 + ["gamma"] * 3 + ["bad", "none"])
_BAD_LENGTHS = st.sampled_from([b"-1", b"abc", b"1" * 30, b"1, 2", b" "])


@st.composite
def _hostile(draw: st.DrawFn) -> Hostile:
    target, methods, route = draw(ROUTED_PATHS)
    method = draw(st.sampled_from(methods)) if draw(st.integers(0, 3)) else draw(_ANY_METHOD)
    body, ctype = draw(BODIES)
    request = Hostile(method, target, draw(HEADERS), body, ctype)
    request.auth = draw(_AUTH)
    request.route = f"{method} {route}"
    framing = draw(st.integers(0, 29))
    if framing == 0:  # declares more than it sends, then stops sending
        request.content_length = len(body) + draw(st.integers(1, 1000))
        request.half_close = True
    elif framing == 1:  # declares less than it sends
        request.content_length = max(0, len(body) - draw(st.integers(1, 10)))
    elif framing == 2:
        request.chunked = True
    elif framing == 3:
        request.content_length = False
    elif framing == 4:  # a Content-Length the parser must refuse
        request.content_length = False
        request.headers.append((b"content-length", draw(_BAD_LENGTHS)))
    return request


HOSTILE = _hostile()


def hostile_requests() -> st.SearchStrategy[Hostile]:
    """One hostile request to a ``/v1`` endpoint."""
    return HOSTILE


_INVOCATION_TARGETS = st.sampled_from(
    [
        b"/v1/sessions/" + IDS["own_invoke"].encode() + b"/invocations",
        b"/v1/sessions/" + IDS["own_invoke"].encode() + b"/invocations?strategy=reject",
        b"/v1/agents/" + IDS["shared_template"].encode() + b"/invocations",
    ]
)


@st.composite
def _invocation(draw: st.DrawFn) -> Hostile:
    body, ctype = draw(BODIES)
    request = Hostile("POST", draw(_INVOCATION_TARGETS), draw(HEADERS), body, ctype)
    request.route = "POST " + request.target.decode().split("?")[0]
    return request


INVOCATIONS = _invocation()


def hostile_invocations() -> st.SearchStrategy[Hostile]:
    """A well-framed invocation of alpha's own session (or agent) with hostile content."""
    return INVOCATIONS
