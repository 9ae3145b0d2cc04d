"""Credentials on every request: a Bearer key, or an HMAC signature.

:class:`AuthManager` is an ``httpx.Auth``: httpx runs it for every request it
sends, so each retry is signed anew, with a fresh nonce and timestamp (the
server refuses a nonce it has seen). The canonicalisation is the one in
:mod:`ppio_sandbox.agent_runtime.signing`, shared with the server.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping

import httpx

from ppio_sandbox.agent_runtime.signing import sign_request

__all__ = ["AuthManager"]


class AuthManager(httpx.Auth):
    """Authenticate requests with an API key, signed with a secret when one is given.

    - key alone: ``Authorization: Bearer <api_key>`` (the key is the secret the
      orchestrator knows);
    - key and secret: ``api_key`` is the access key id, and every request is
      signed with HMAC-SHA256 over method, path, query, host, content type and
      the body's SHA-256 (``PPIO-HMAC-SHA256``).

    >>> AuthManager("my-token").scheme
    'bearer'
    >>> AuthManager("k1", "s3cret").scheme
    'hmac'

    Outside httpx, :meth:`get_auth_headers` gives the headers for a request
    you send yourself:

    >>> AuthManager("my-token").get_auth_headers()
    {'Authorization': 'Bearer my-token'}
    >>> signed = AuthManager("k1", "s3cret").get_auth_headers(
    ...     "POST", "http://127.0.0.1:8900/v1/sessions", body=b'{"template_id": "assistant"}',
    ...     headers={"content-type": "application/json"})
    >>> sorted(signed)
    ['Authorization', 'X-PPIO-Content-SHA256', 'X-PPIO-Date', 'X-PPIO-Nonce']
    """

    requires_request_body = True  # the signature covers the body

    def __init__(self, api_key: str, api_secret: str | None = None) -> None:
        if not api_key or any(c.isspace() for c in api_key):
            raise ValueError("api_key must be a non-empty string without spaces")
        if api_secret is not None and not api_secret:
            raise ValueError("api_secret must be non-empty when given")
        self.api_key = api_key
        self._secret = api_secret

    @property
    def scheme(self) -> str:
        """``"hmac"`` when requests are signed, ``"bearer"`` otherwise."""
        return "hmac" if self._secret is not None else "bearer"

    def auth_headers(self, request: httpx.Request) -> dict[str, str]:
        """The headers that authenticate ``request`` (its body must be read)."""
        if self._secret is None:
            return {"Authorization": f"Bearer {self.api_key}"}
        raw_path, _, _ = request.url.raw_path.partition(b"?")
        return sign_request(
            request.method,
            raw_path.decode("ascii"),
            request.url.query.decode("ascii"),
            request.headers,
            request.content,
            access_key=self.api_key,
            secret=self._secret,
        )

    def get_auth_headers(
        self,
        method: str = "GET",
        url: str | None = None,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The headers that authenticate ``method url`` with ``body`` and ``headers``.

        For a request sent by other means than this client. A Bearer key
        needs no request; a signature covers the method, the absolute
        ``url`` (path, query and host), the content type in ``headers`` and
        the body, so send exactly those, with every header returned, once
        (each call makes a new nonce).
        """
        if self._secret is None:
            return {"Authorization": f"Bearer {self.api_key}"}
        if url is None:
            raise ValueError("a signed request needs its absolute url (and method, body)")
        request = httpx.Request(method, url, content=body, headers=dict(headers or {}))
        return self.auth_headers(request)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(self.auth_headers(request))
        yield request

    def __repr__(self) -> str:
        return f"AuthManager(api_key={self.api_key!r}, scheme={self.scheme!r})"
