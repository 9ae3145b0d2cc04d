from __future__ import annotations

import doctest
import hashlib
import hmac
from typing import Any

import pytest

from ppio_sandbox.agent_runtime import signing
from ppio_sandbox.agent_runtime.errors import AuthenticationError
from ppio_sandbox.agent_runtime.signing import (
    Authorization,
    canonical_query,
    canonical_request,
    parse_authorization,
    sign_request,
    string_to_sign,
    verify_signature,
)

# The fixed vector: repeated keys, characters needing encoding, a key without
# "=", untidy header whitespace, an extra signed header and an unsigned one.
METHOD = "post"
PATH = "/v1/agents/my%20agent/invocations"
QUERY = "tag=b&tag=a&q=caf%C3%A9+au+lait&empty=&flag&slash=a/b&tilde=~x"
HEADERS = {
    "Host": "api.ppio.example:8900",
    "Content-Type": "  application/json;   charset=utf-8 ",
    "X-Custom": "a\t  b",
    "User-Agent": "test/1.0",
}
BODY = b'{"query": "hi"}'
ACCESS_KEY = "AKID123"
SECRET = "wJalrXUtnFEMI/K7MDENG"
TIMESTAMP = 1700000000
NONCE = "n0nce-0123456789_ABC"

BODY_SHA256 = "bf943d414381230c831ab0f2e0d041641ef1a6cb57235b90216b2bced1c799ce"
SIGNED = "content-type;host;x-custom;x-ppio-content-sha256;x-ppio-date;x-ppio-nonce"
CANONICAL = (
    "POST\n"
    "/v1/agents/my%20agent/invocations\n"
    "empty=&flag=&q=caf%C3%A9%20au%20lait&slash=a%2Fb&tag=a&tag=b&tilde=~x\n"
    "content-type:application/json; charset=utf-8\n"
    "host:api.ppio.example:8900\n"
    "x-custom:a b\n"
    f"x-ppio-content-sha256:{BODY_SHA256}\n"
    "x-ppio-date:1700000000\n"
    "x-ppio-nonce:n0nce-0123456789_ABC\n"
    "\n"
    f"{SIGNED}\n"
    f"{BODY_SHA256}"
)
STRING_TO_SIGN = (
    "PPIO-HMAC-SHA256\n1700000000\nn0nce-0123456789_ABC\n"
    "4048d4c0213c0d73de0c66c4cc5a9ae2c74f88bb018bbb54d643d43412aa169a"
)
SIGNATURE = "3c95137dc266a66c361adc1b8e2caef6c5a5c54db0f37412bd25bccc65a3080d"


def _sign(**changes: Any) -> dict[str, str]:
    args: dict[str, Any] = {
        "method": METHOD,
        "url_path": PATH,
        "query": QUERY,
        "headers": HEADERS,
        "body": BODY,
        "access_key": ACCESS_KEY,
        "secret": SECRET,
        "timestamp": TIMESTAMP,
        "nonce": NONCE,
        "extra_signed_headers": ["X-Custom"],
    }
    args.update(changes)
    return sign_request(**args)


def test_fixed_vector_literals_agree_with_an_independent_computation() -> None:
    assert hashlib.sha256(BODY).hexdigest() == BODY_SHA256
    digest = hashlib.sha256(CANONICAL.encode()).hexdigest()
    assert f"PPIO-HMAC-SHA256\n{TIMESTAMP}\n{NONCE}\n{digest}" == STRING_TO_SIGN
    expected = hmac.new(SECRET.encode(), STRING_TO_SIGN.encode(), hashlib.sha256).hexdigest()
    assert expected == SIGNATURE


def test_fixed_vector_canonical_request() -> None:
    headers = {**HEADERS, "X-PPIO-Date": "1700000000", "X-PPIO-Nonce": NONCE}
    headers["X-PPIO-Content-SHA256"] = BODY_SHA256
    names = SIGNED.upper().split(";")  # any case, any order
    got = canonical_request(
        METHOD, PATH, QUERY, headers, signed_headers=names[::-1], content_sha256=BODY_SHA256
    )
    assert got == CANONICAL
    assert string_to_sign(TIMESTAMP, NONCE, got) == STRING_TO_SIGN


def test_fixed_vector_signed_headers() -> None:
    assert _sign() == {
        "X-PPIO-Date": "1700000000",
        "X-PPIO-Nonce": NONCE,
        "X-PPIO-Content-SHA256": BODY_SHA256,
        "Authorization": (
            f"PPIO-HMAC-SHA256 Credential={ACCESS_KEY}, SignedHeaders={SIGNED}, "
            f"Signature={SIGNATURE}"
        ),
    }


def test_fixed_vector_verifies_as_the_server_receives_it() -> None:
    raw_headers = [(k.lower(), v) for k, v in {**HEADERS, **_sign()}.items()]
    signed = verify_signature(
        "POST", PATH.encode(), QUERY.encode(), raw_headers, BODY, secret=SECRET
    )
    assert signed == (ACCESS_KEY, TIMESTAMP, NONCE)


def test_query_as_data_and_decoded_path_canonicalise_like_the_wire_form() -> None:
    as_data = {
        "tag": ["b", "a"],
        "q": "café au lait",
        "empty": "",
        "flag": "",
        "slash": "a/b",
        "tilde": "~x",
    }
    assert canonical_query(as_data) == canonical_query(QUERY)
    assert canonical_query(list(as_data.items())[1:2]) == "q=caf%C3%A9%20au%20lait"
    assert _sign(query=as_data, url_path="/v1/agents/my agent/invocations") == _sign()


@pytest.mark.parametrize(
    ("path", "canonical"),
    [
        ("/v1/a:b@c;d=e,f+g!$&'()*~_.-/%2F", "/v1/a:b@c;d=e,f+g!$&'()*~_.-/%2F"),
        (b"/v1/a:b@c;d=e,f+g!$&'()*~_.-/%2F", "/v1/a:b@c;d=e,f+g!$&'()*~_.-/%2F"),
        ("/v1/caf\u00e9 x?y", "/v1/caf%C3%A9%20x%3Fy"),
        (b"/v1/caf\xc3\xa9 x", "/v1/caf%C3%A9%20x"),
        ("", "/"),
    ],
)
def test_path_is_kept_as_sent_and_only_illegal_characters_are_encoded(
    path: str | bytes, canonical: str
) -> None:
    got = canonical_request("GET", path, "", {}, signed_headers=[], content_sha256="-")
    assert got.split("\n")[1] == canonical


def test_unsigned_headers_may_change() -> None:
    headers = {**HEADERS, "User-Agent": "other/2.0", **_sign()}
    verify_signature("POST", PATH, QUERY, headers, BODY, secret=SECRET)


TAMPERED = {
    "method": {"method": "PUT"},
    "path": {"url_path": "/v1/agents/other/invocations"},
    "query": {"query": "tag=b&tag=c&q=caf%C3%A9+au+lait&empty=&flag&slash=a/b&tilde=~x"},
    "host": {"headers": {**HEADERS, "Host": "evil.example"}},
    "content-type": {"headers": {**HEADERS, "Content-Type": "application/msgpack"}},
    "extra header": {"headers": {**HEADERS, "X-Custom": "a c"}},
    "body": {"body": b'{"query": "ho"}'},
    "timestamp": {"timestamp": TIMESTAMP + 1},
    "nonce": {"nonce": "n0nce-0123456789_ABD"},
    "secret": {"secret": SECRET + "x"},
}


@pytest.mark.parametrize("change", TAMPERED.values(), ids=TAMPERED.keys())
def test_every_signed_field_changes_the_signature(change: dict[str, Any]) -> None:
    assert _sign(**change)["Authorization"] != _sign()["Authorization"]


REQUEST_TAMPERED = {
    "method": {"method": "PUT"},
    "path": {"path": "/v1/agents/my%20agent/invocations/"},
    "query": {"query": QUERY + "&x=1"},
    "host": {"headers": {"Host": "evil.example"}},
    "content-type": {"headers": {"Content-Type": "application/msgpack"}},
    "extra header": {"headers": {"X-Custom": "ab"}},
    "timestamp": {"headers": {"X-PPIO-Date": str(TIMESTAMP + 1)}},
    "nonce": {"headers": {"X-PPIO-Nonce": "n0nce-0123456789_ABD"}},
    "body and its hash": {
        "body": b"{}",
        "headers": {"X-PPIO-Content-SHA256": hashlib.sha256(b"{}").hexdigest()},
    },
}


@pytest.mark.parametrize("change", REQUEST_TAMPERED.values(), ids=REQUEST_TAMPERED.keys())
def test_a_tampered_request_fails_verification(change: dict[str, Any]) -> None:
    request: dict[str, Any] = {"method": "POST", "path": PATH, "query": QUERY, "body": BODY}
    headers = {**HEADERS, **_sign(), **change.get("headers", {})}
    request.update({k: v for k, v in change.items() if k != "headers"})
    with pytest.raises(AuthenticationError, match="signature does not match") as info:
        verify_signature(
            request["method"],
            request["path"],
            request["query"],
            headers,
            request["body"],
            secret=SECRET,
        )
    assert SECRET not in str(info.value)
    assert "string_to_sign" in info.value.details


def test_body_changed_without_its_hash_is_named() -> None:
    headers = {**HEADERS, **_sign()}
    with pytest.raises(AuthenticationError, match="does not match the body"):
        verify_signature("POST", PATH, QUERY, headers, b"{}", secret=SECRET)


def test_content_type_present_must_be_signed() -> None:
    added = _sign(headers={"Host": "api.ppio.example:8900"}, extra_signed_headers=())
    headers = {"Host": "api.ppio.example:8900", "Content-Type": "text/plain", **added}
    with pytest.raises(AuthenticationError, match="must be signed: content-type"):
        verify_signature("POST", PATH, QUERY, headers, BODY, secret=SECRET)


def test_required_headers_must_be_signed() -> None:
    auth = Authorization(ACCESS_KEY, ("content-type", "host", "x-ppio-date"), "0" * 64)
    headers = {**HEADERS, **_sign()}
    with pytest.raises(
        AuthenticationError, match="must be signed: x-ppio-content-sha256, x-ppio-nonce"
    ):
        verify_signature("POST", PATH, QUERY, headers, BODY, secret=SECRET, authorization=auth)


def test_signed_header_missing_from_the_request_is_named() -> None:
    headers = {k: v for k, v in {**HEADERS, **_sign()}.items() if k != "X-Custom"}
    with pytest.raises(AuthenticationError, match="missing from the request: x-custom"):
        verify_signature("POST", PATH, QUERY, headers, BODY, secret=SECRET)


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        ("X-PPIO-Date", "yesterday", "must be unix seconds"),
        ("X-PPIO-Date", "9" * 5000, "must be unix seconds"),
        ("X-PPIO-Nonce", "short", "16..64"),
        ("X-PPIO-Nonce", "n0nce-0123456789+ABC", "16..64"),
    ],
)
def test_malformed_date_or_nonce(header: str, value: str, message: str) -> None:
    headers = {**HEADERS, **_sign(), header: value}
    with pytest.raises(AuthenticationError, match=message):
        verify_signature("POST", PATH, QUERY, headers, BODY, secret=SECRET)


def test_parse_authorization() -> None:
    value = _sign()["Authorization"]
    assert parse_authorization(value) == Authorization(
        ACCESS_KEY, tuple(SIGNED.split(";")), SIGNATURE
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "scheme must be PPIO-HMAC-SHA256"),
        ("Bearer abc", "scheme must be PPIO-HMAC-SHA256, got 'Bearer'"),
        ("PPIO-HMAC-SHA256 Credential=a, Signature=" + "0" * 64, r"missing \['SignedHeaders'\]"),
        ("PPIO-HMAC-SHA256 Credential=a, SignedHeaders=host, Signature", "expected name=value"),
        (
            "PPIO-HMAC-SHA256 Credential=a, Credential=b, SignedHeaders=host, Signature=00",
            "Credential given twice",
        ),
        ("PPIO-HMAC-SHA256 Credential=, SignedHeaders=host, Signature=" + "0" * 64, "empty"),
        ("PPIO-HMAC-SHA256 Credential=a, SignedHeaders=host, Signature=xyz", "64 hex digits"),
        (
            "PPIO-HMAC-SHA256 Credential=a, SignedHeaders=host;;x, Signature=" + "0" * 64,
            "SignedHeaders",
        ),
        (
            "PPIO-HMAC-SHA256 Credential=a, SignedHeaders=host;HOST, Signature=" + "0" * 64,
            "repeats",
        ),
    ],
)
def test_parse_authorization_says_what_is_malformed(value: str, message: str) -> None:
    with pytest.raises(AuthenticationError, match=message):
        parse_authorization(value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url_path": "/x?a=1"}, "must not contain the query"),
        ({"headers": {"Content-Type": "text/plain"}}, "must include Host"),
        ({"nonce": "too-short"}, "nonce must be"),
        ({"access_key": "a b"}, "access_key"),
    ],
)
def test_sign_request_rejects_misuse(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _sign(**change)


def test_fresh_nonce_and_current_time_by_default() -> None:
    first = _sign(timestamp=None, nonce=None)
    second = _sign(timestamp=None, nonce=None)
    assert first["X-PPIO-Nonce"] != second["X-PPIO-Nonce"]
    assert 16 <= len(first["X-PPIO-Nonce"]) <= 64
    assert int(first["X-PPIO-Date"]) > TIMESTAMP
    verify_signature("POST", PATH, QUERY, {**HEADERS, **first}, BODY, secret=SECRET)


def test_module_docstring_examples_run() -> None:
    result = doctest.testmod(signing)
    assert result.attempted >= 4
    assert result.failed == 0
