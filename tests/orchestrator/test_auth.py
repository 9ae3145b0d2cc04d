from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import pytest

from ppio_sandbox.agent_runtime.errors import AuthenticationError
from ppio_sandbox.agent_runtime.signing import sign_request
from ppio_sandbox.orchestrator import auth as auth_module
from ppio_sandbox.orchestrator.auth import (
    ApiKey,
    Authenticator,
    KeyRing,
    Principal,
    parse_key_spec,
)

T0 = 1_700_000_000
SECRET_A1 = "secret-a1-0123456789"
SECRET_A2 = "secret-a2-0123456789"
SECRET_B = "secret-b-0123456789"
HOST = "orchestrator.example:8900"
PATH = "/v1/sessions/s1/invocations"
QUERY = b"stream=false&tag=x&tag=y"
BODY = b'{"prompt": "hello"}'

Headers = list[tuple[bytes, bytes]]


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _ring() -> KeyRing:
    return KeyRing(
        [
            ApiKey("a1", SECRET_A1, "acme"),
            ApiKey("a2", SECRET_A2, "acme"),
            ApiKey("b1", SECRET_B, "globex"),
        ]
    )


def _authenticator(**kwargs: Any) -> tuple[Authenticator, FakeClock]:
    clock = FakeClock()
    return Authenticator(_ring(), clock=clock, **kwargs), clock


def _bearer(token: str) -> Headers:
    return [(b"host", HOST.encode()), (b"authorization", f"Bearer {token}".encode())]


def _signed(
    *,
    key_id: str = "a1",
    secret: str = SECRET_A1,
    timestamp: int = T0,
    nonce: str = "nonce-0000000000000001",
    method: str = "POST",
    body: bytes = BODY,
) -> Headers:
    base = {"Host": HOST, "Content-Type": "application/json"}
    added = sign_request(
        method,
        PATH,
        QUERY.decode(),
        base,
        body,
        access_key=key_id,
        secret=secret,
        timestamp=timestamp,
        nonce=nonce,
    )
    return [(k.lower().encode(), v.encode()) for k, v in {**base, **added}.items()]


def _replace(headers: Headers, name: bytes, value: bytes) -> Headers:
    return [(k, value if k == name else v) for k, v in headers]


def _hmac_request(auth: Authenticator, headers: Headers, **changes: Any) -> Principal:
    request: dict[str, Any] = {
        "method": "POST",
        "path": PATH,
        "query_string": QUERY,
        "headers": headers,
        "body": BODY,
    }
    request.update(changes)
    return auth.authenticate(**request)


# --- Bearer -------------------------------------------------------------------------------------


def test_bearer_key_authenticates_as_its_tenant() -> None:
    auth, _ = _authenticator()
    assert auth.authenticate("GET", "/v1/sessions", b"", _bearer(SECRET_B), b"") == Principal(
        "globex", "b1"
    )


def test_bearer_scheme_is_case_insensitive() -> None:
    auth, _ = _authenticator()
    headers = [(b"Authorization", f"bearer {SECRET_A1}".encode())]
    assert auth.authenticate("GET", "/", b"", headers, b"") == Principal("acme", "a1")


def test_bearer_unknown_key_is_rejected_without_echoing_it() -> None:
    auth, _ = _authenticator()
    with pytest.raises(AuthenticationError, match="unknown API key") as info:
        auth.authenticate("GET", "/", b"", _bearer(SECRET_A1 + "x"), b"")
    assert SECRET_A1 not in str(info.value)
    assert info.value.status_code == 401


def test_bearer_prefix_of_a_secret_is_rejected() -> None:
    auth, _ = _authenticator()
    with pytest.raises(AuthenticationError, match="unknown API key"):
        auth.authenticate("GET", "/", b"", _bearer(SECRET_A1[:-1]), b"")


def test_missing_credentials() -> None:
    auth, _ = _authenticator()
    with pytest.raises(AuthenticationError, match="missing credentials"):
        auth.authenticate("GET", "/", b"", [(b"host", HOST.encode())], b"")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"Bearer", "malformed Bearer"),
        (b"Bearer   ", "malformed Bearer"),
        (b"Bearer two words", "malformed Bearer"),
        (b"Basic dXNlcjpwYXNz", "unsupported authorization scheme 'Basic'"),
        (b"secret-a1-0123456789", "unsupported authorization scheme"),
    ],
)
def test_malformed_authorization(value: bytes, message: str) -> None:
    auth, _ = _authenticator()
    with pytest.raises(AuthenticationError, match=message):
        auth.authenticate("GET", "/", b"", [(b"authorization", value)], b"")


def test_two_authorization_headers_are_rejected() -> None:
    auth, _ = _authenticator()
    headers = [*_bearer(SECRET_A1), (b"authorization", f"Bearer {SECRET_B}".encode())]
    with pytest.raises(AuthenticationError, match="more than one"):
        auth.authenticate("GET", "/", b"", headers, b"")


# --- HMAC ---------------------------------------------------------------------------------------


def test_hmac_signed_request_authenticates_as_its_tenant() -> None:
    auth, _ = _authenticator()
    assert _hmac_request(auth, _signed(key_id="b1", secret=SECRET_B)) == Principal("globex", "b1")


def test_hmac_accepts_raw_path_bytes() -> None:
    auth, _ = _authenticator()
    assert _hmac_request(auth, _signed(), path=PATH.encode()) == Principal("acme", "a1")


TAMPERED: dict[str, dict[str, Any]] = {
    "method": {"method": "PUT"},
    "path": {"path": "/v1/sessions/s2/invocations"},
    "query": {"query_string": b"stream=true&tag=x&tag=y"},
    "host header": {"header": (b"host", b"evil.example")},
    "content-type": {"header": (b"content-type", b"application/msgpack")},
    "timestamp": {"header": (b"x-ppio-date", str(T0 + 1).encode())},
    "nonce": {"header": (b"x-ppio-nonce", b"nonce-0000000000000002")},
    "signature": {"signature": "0" * 64},
}


@pytest.mark.parametrize("change", TAMPERED.values(), ids=TAMPERED.keys())
def test_hmac_rejects_every_tampered_signed_field(change: dict[str, Any]) -> None:
    auth, _ = _authenticator()
    headers = _signed()
    if "header" in change:
        headers = _replace(headers, *change.pop("header"))
    if "signature" in change:
        value = dict(headers)[b"authorization"].decode()
        value = value[: value.index("Signature=")] + "Signature=" + change.pop("signature")
        headers = _replace(headers, b"authorization", value.encode())
    with pytest.raises(AuthenticationError, match="signature does not match") as info:
        _hmac_request(auth, headers, **change)
    assert SECRET_A1 not in str(info.value)


def test_hmac_rejects_a_tampered_body() -> None:
    auth, _ = _authenticator()
    with pytest.raises(AuthenticationError, match="does not match the body"):
        _hmac_request(auth, _signed(), body=b'{"prompt": "rm -rf"}')


def test_hmac_rejects_a_tampered_body_with_a_matching_hash_header() -> None:
    auth, _ = _authenticator()
    evil = b'{"prompt": "rm -rf"}'
    signed_for_evil = dict(_signed(body=evil))[b"x-ppio-content-sha256"]
    headers = _replace(_signed(), b"x-ppio-content-sha256", signed_for_evil)
    with pytest.raises(AuthenticationError, match="signature does not match"):
        _hmac_request(auth, headers, body=evil)


def test_hmac_rejects_an_unknown_access_key() -> None:
    auth, _ = _authenticator()
    with pytest.raises(AuthenticationError, match="unknown access key 'zz'"):
        _hmac_request(auth, _signed(key_id="zz"))


def test_hmac_rejects_another_keys_credential() -> None:
    auth, _ = _authenticator()
    with pytest.raises(AuthenticationError, match="signature does not match for key 'b1'"):
        _hmac_request(auth, _signed(key_id="b1", secret=SECRET_A1))


@pytest.mark.parametrize("skew", [-300, -299, 0, 299, 300])
def test_clock_skew_within_the_window_is_accepted(skew: int) -> None:
    auth, _ = _authenticator()
    assert _hmac_request(auth, _signed(timestamp=T0 + skew)) == Principal("acme", "a1")


@pytest.mark.parametrize(
    ("skew", "message"),
    [(301, "301 s ahead of the server clock"), (-301, "301 s behind the server clock")],
)
def test_clock_skew_beyond_the_window_is_rejected(skew: int, message: str) -> None:
    auth, _ = _authenticator()
    with pytest.raises(AuthenticationError, match=message) as info:
        _hmac_request(auth, _signed(timestamp=T0 + skew))
    assert "beyond the 300 s window" in str(info.value)


def test_fractional_clock_just_beyond_the_window_is_rejected() -> None:
    auth, clock = _authenticator()
    clock.now = T0 + 300.5
    with pytest.raises(AuthenticationError, match=r"300\.5 s behind"):
        _hmac_request(auth, _signed())


def test_replayed_nonce_is_rejected() -> None:
    auth, clock = _authenticator()
    headers = _signed()
    _hmac_request(auth, headers)
    clock.now += 10
    with pytest.raises(AuthenticationError, match="nonce already used"):
        _hmac_request(auth, headers)


def test_replay_stays_rejected_until_the_timestamp_check_takes_over() -> None:
    # A short nonce_ttl: the nonce is still kept until its timestamp leaves the window.
    auth, clock = _authenticator(nonce_ttl=1)
    headers = _signed(timestamp=T0 + 300)  # stamped as far ahead as allowed
    _hmac_request(auth, headers)
    for now in (T0 + 2, T0 + 300, T0 + 600):
        clock.now = now
        with pytest.raises(AuthenticationError, match="nonce already used"):
            _hmac_request(auth, headers)
    clock.now = T0 + 601
    with pytest.raises(AuthenticationError, match="behind the server clock"):
        _hmac_request(auth, headers)


def test_the_same_nonce_under_another_key_is_not_a_replay() -> None:
    auth, _ = _authenticator()
    _hmac_request(auth, _signed())
    assert _hmac_request(auth, _signed(key_id="b1", secret=SECRET_B)).tenant == "globex"


def test_a_bad_signature_does_not_consume_the_nonce() -> None:
    auth, _ = _authenticator()
    with pytest.raises(AuthenticationError, match="signature"):
        _hmac_request(auth, _signed(secret="wrong-secret-000000"))
    assert _hmac_request(auth, _signed()) == Principal("acme", "a1")


def test_nonce_cache_is_bounded_oldest_first() -> None:
    auth, _ = _authenticator(max_nonces=2)
    first, second, third = (_signed(nonce=f"nonce-{n:016d}") for n in range(3))
    for headers in (first, second, third):
        _hmac_request(auth, headers)
    with pytest.raises(AuthenticationError, match="nonce already used"):
        _hmac_request(auth, third)
    with pytest.raises(AuthenticationError, match="nonce already used"):
        _hmac_request(auth, second)
    # The oldest was evicted: documented, and only a signed request can push it out.
    assert _hmac_request(auth, first) == Principal("acme", "a1")


def test_authenticator_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="positive"):
        Authenticator(_ring(), window=0)


# --- Keys, tenants, rotation ----------------------------------------------------------------------


def test_two_keys_of_one_tenant_both_work() -> None:
    auth, _ = _authenticator()
    assert auth.authenticate("GET", "/", b"", _bearer(SECRET_A1), b"") == Principal("acme", "a1")
    assert auth.authenticate("GET", "/", b"", _bearer(SECRET_A2), b"") == Principal("acme", "a2")
    assert _hmac_request(auth, _signed(key_id="a2", secret=SECRET_A2)) == Principal("acme", "a2")


def test_empty_keyring_turns_authentication_off() -> None:
    auth = Authenticator(KeyRing())
    assert KeyRing().empty
    assert not auth.enabled
    assert auth.authenticate("GET", "/", b"", [], b"") == Principal("default", None)
    assert auth.authenticate("GET", "/", b"", _bearer("anything"), b"") == Principal(
        "default", None
    )


def test_key_specs() -> None:
    assert parse_key_spec("acme:k1:s:with:colons") == ApiKey("k1", "s:with:colons", "acme")
    assert parse_key_spec(" k2:s2 ") == ApiKey("k2", "s2", "default")
    for bad in ("justone", ":k:s", "t::s", "t:k:", "t:k:has space", "t:k,x:s"):
        with pytest.raises(ValueError, match=r"expected|must be non-empty|secret") as info:
            parse_key_spec(bad)
        assert bad not in str(info.value)


def test_secret_is_not_in_repr() -> None:
    assert "s3cret" not in repr(ApiKey("k", "s3cret-value", "t"))


def test_keyring_rejects_duplicate_key_ids_and_secrets() -> None:
    with pytest.raises(ValueError, match="duplicate key id 'k1'"):
        KeyRing([ApiKey("k1", "s1"), ApiKey("k1", "s2", "other")])
    with pytest.raises(ValueError, match="reuses the secret"):
        KeyRing([ApiKey("k1", "same"), ApiKey("k2", "same")])


def test_keys_from_env_var() -> None:
    env = {"PPIO_ORCHESTRATOR_KEYS": " acme:k1:s1 , k2:s2,, "}
    ring = KeyRing.from_env(env)
    assert [(k.tenant, k.key_id, k.secret) for k in ring] == [
        ("acme", "k1", "s1"),
        ("default", "k2", "s2"),
    ]
    assert KeyRing.from_env({}).empty


def test_keys_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPIO_ORCHESTRATOR_KEYS", "acme:k1:s1")
    assert KeyRing.from_env().get("k1") == ApiKey("k1", "s1", "acme")


def test_bad_env_entry_names_its_position_not_its_secret() -> None:
    with pytest.raises(ValueError, match="PPIO_ORCHESTRATOR_KEYS #2") as info:
        KeyRing.from_env({"PPIO_ORCHESTRATOR_KEYS": "k1:s1,a:b:c d"})
    assert "c d" not in str(info.value)


def test_keys_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# rotated 2026-11\n\nacme:k1:s1\n  acme:k2:s2  # not a comment\nk3:s3\n")
    with pytest.raises(ValueError, match="line 4"):
        KeyRing.from_file(path)
    path.write_text("# rotated 2026-11\n\nacme:k1:s1\n  acme:k2:s2\nk3:s3\n")
    ring = KeyRing.from_file(path)
    assert [(k.tenant, k.key_id) for k in ring] == [
        ("acme", "k1"),
        ("acme", "k2"),
        ("default", "k3"),
    ]
    assert ring.tenants() == {"acme", "default"}


def test_keys_file_json(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    doc = {
        "keys": [
            {"tenant": "acme", "key_id": "k1", "secret": "s1"},
            {"key_id": "k2", "secret": "s2"},
        ]
    }
    path.write_text(json.dumps(doc))
    ring = KeyRing.from_file(path)
    assert ring.get("k1") == ApiKey("k1", "s1", "acme")
    assert ring.get("k2") == ApiKey("k2", "s2", "default")
    assert len(ring) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"keys": [', "not valid JSON"),
        ('{"tokens": []}', "expected"),
        ('{"keys": [{"key_id": "k1"}]}', r"keys\[0\] needs string"),
        ('{"keys": [{"key_id": "k1", "secret": 5}]}', r"keys\[0\] needs string"),
        ('{"keys": [{"key_id": "k 1", "secret": "s"}]}', r"keys\[0\]: key_id"),
    ],
)
def test_keys_file_json_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        KeyRing.from_file(path)


def test_load_combines_cli_env_and_files(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("globex:k3:s3\n")
    env = {"PPIO_ORCHESTRATOR_KEYS": "acme:k2:s2"}
    ring = KeyRing.load(["acme:k1:s1"], environ=env, files=[path])
    assert [k.key_id for k in ring] == ["k1", "k2", "k3"]
    auth = Authenticator(ring)
    assert auth.enabled
    assert auth.authenticate("GET", "/", b"", _bearer("s3"), b"") == Principal("globex", "k3")
    with pytest.raises(ValueError, match="duplicate"):
        KeyRing.load(["acme:k2:other"], environ=env)


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(auth_module)
    assert result.attempted >= 1
    assert result.failed == 0
