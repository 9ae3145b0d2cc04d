"""The orchestrator's management API on Quart (QuartTrio on trio): templates and sessions.

Invocations do not come here: the front door (``frontend.py``) sends them to
the lean hot path. Requests reaching these routes are already authenticated;
the tenant is in ``request.scope["ppio.tenant"]``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from ppio_sandbox.agent_runtime.errors import (
    MethodNotAllowedError,
    NotFoundError,
    PPIOAgentRuntimeError,
    ValidationError,
)

from ._validate import check_session_id, check_timeout_seconds
from .host import Orchestrator
from .wire import decode_object, encode_reply, record_view, session_view, template_view

__all__ = ["create_api"]

_ARCHIVE_TYPES = (
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/octet-stream",
)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_RESERVED_ENV = frozenset({"PPIO_AGENT_BIND", "PPIO_SESSION_ID"})


def _env_vars(value: Any) -> dict[str, str]:
    """Validate a session's ``env_vars``: an object of strings with shell-safe names."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("env_vars must be an object of strings")
    for name, text in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValidationError(f"env_vars: {name!r} is not a valid variable name")
        if name in _RESERVED_ENV:
            raise ValidationError(f"env_vars: {name} is set by the orchestrator")
        if not isinstance(text, str):
            raise ValidationError(f"env_vars must be an object of strings; {name} is not one")
        if "\x00" in text:
            raise ValidationError(f"env_vars: the value of {name} contains a NUL character")
    return value


def create_api(host: Orchestrator, app_class: type[Quart] = Quart) -> Quart:
    """Build the management API for ``host`` (pass ``QuartTrio`` on trio)."""
    # An explicit instance path: Flask cannot locate a namespace package.
    app = app_class("ppio_sandbox.orchestrator", instance_path=str(host.config.data_dir.resolve()))
    app.config["MAX_CONTENT_LENGTH"] = None  # the front door bounds bodies
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    wall_offset = time.time() - host.clock()

    def tenant() -> str:
        scope: dict[str, Any] = request.scope  # type: ignore[assignment]
        return str(scope["ppio.tenant"])

    def reply(value: Any, status: int = 200) -> Response:
        body, ctype = encode_reply(value, request.headers.get("accept", "").encode())
        return Response(body, status=status, content_type=ctype.decode())

    async def body_object(allow_empty: bool = False) -> dict[str, Any]:
        data: bytes = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        ctype = request.headers.get("content-type", "").encode()
        return decode_object(ctype, data, allow_empty=allow_empty)

    def view(session: Any) -> dict[str, Any]:
        return session_view(session, wall_offset=wall_offset)

    def template_json(template: Any) -> dict[str, Any]:
        # "sandbox": where it runs (kind), what its spec asks (requested), and why.
        return {**template_view(template), "sandbox": host.sandbox_policy.decide(template).view()}

    @app.errorhandler(PPIOAgentRuntimeError)
    async def on_error(exc: PPIOAgentRuntimeError) -> Response:
        response = reply(exc.to_envelope(request.headers.get("x-ppio-request-id")), exc.status_code)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(max(1, round(retry_after)))
        return response

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        err: PPIOAgentRuntimeError
        if code == 404:
            err = NotFoundError(f"no route {request.method} {request.path}")
        elif code == 405:
            err = MethodNotAllowedError(f"{request.method} not allowed on {request.path}")
        elif code >= 500:
            # An unhandled exception: a server fault, never the caller's.
            err = PPIOAgentRuntimeError("internal error; see the orchestrator's log")
            return reply(err.to_envelope(), 500)
        else:
            err = ValidationError(exc.description or exc.name)
        return reply(err.to_envelope(), code if code in (404, 405) else 400)

    # -- templates ----------------------------------------------------------

    @app.get("/v1/templates")
    async def list_templates() -> Response:
        templates = await host.list_templates(tenant())
        return reply({"templates": [template_json(t) for t in templates]})

    @app.get("/v1/templates/<template_id>")
    async def get_template(template_id: str) -> Response:
        return reply(template_json(await host.resolve_template(template_id, tenant())))

    @app.post("/v1/templates")
    async def deploy_template() -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in _ARCHIVE_TYPES:
            raise ValidationError(
                "upload the agent directory as a tar.gz archive (Content-Type application/gzip)"
            )
        data: bytes = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        if not data:
            raise ValidationError("empty archive")
        template = await host.deploy_archive(data, tenant())
        return reply(template_json(template), 202)

    @app.delete("/v1/templates/<template_id>")
    async def delete_template(template_id: str) -> Response:
        template = await host.templates.resolve(template_id, tenant())
        await host.delete_template(template, tenant())
        return reply({"template_id": template.id, "deleted": True})

    # -- sessions -----------------------------------------------------------

    @app.post("/v1/sessions")
    async def create_session() -> Response:
        body = await body_object()
        template_id = body.get("template_id")
        if not isinstance(template_id, str) or not template_id:
            raise ValidationError("template_id is required")
        timeout = body.get("timeout_seconds")
        if timeout is not None:
            timeout = check_timeout_seconds(timeout)
        env_vars = _env_vars(body.get("env_vars"))
        metadata = body.get("metadata")
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, dict):
            raise ValidationError("metadata must be an object")
        session_id = body.get("session_id")
        if session_id is not None:
            session_id = check_session_id(session_id)
        session = await host.create_session(
            tenant(),
            template_id,
            session_id=session_id,
            timeout_seconds=timeout,
            env_vars=env_vars,
            metadata=metadata,
        )
        return reply(view(session), 201)

    @app.get("/v1/sessions")
    async def list_sessions() -> Response:
        owner = tenant()
        resident = [view(s) for s in host.list_sessions(owner)]
        if request.args.get("resident"):  # another node merging every node's sessions
            return reply({"sessions": resident})
        dormant = [record_view(r) for r in await host.list_dormant(owner)]
        return reply({"sessions": resident + dormant})

    @app.get("/v1/sessions/<session_id>")
    async def get_session(session_id: str) -> Response:
        return reply(view(await host.open_session(tenant(), session_id)))

    @app.delete("/v1/sessions/<session_id>")
    async def close_session(session_id: str) -> Response:
        session = await host.open_session(tenant(), session_id)
        await host.close_session(session, "closed by the caller")
        return reply(view(session))

    @app.post("/v1/sessions/<session_id>/pause")
    async def pause_session(session_id: str) -> Response:
        session = await host.open_session(tenant(), session_id)
        await host.pause(session)
        return reply(view(session))

    @app.post("/v1/sessions/<session_id>/resume")
    async def resume_session(session_id: str) -> Response:
        session = await host.open_session(tenant(), session_id)
        await host.resume(session)
        return reply(view(session))

    @app.route("/v1/sessions/<session_id>/timeout", methods=["POST", "PUT"])
    async def set_timeout(session_id: str) -> Response:
        session = await host.open_session(tenant(), session_id)
        body = await body_object()
        host.set_timeout(session, check_timeout_seconds(body.get("timeout_seconds")))
        return reply(view(session))

    @app.get("/v1/sessions/<session_id>/ping")
    async def ping_session(session_id: str) -> Response:
        session = await host.open_session(tenant(), session_id)
        if session.sandbox is None:
            raise ValidationError(f"session {session_id} has no running sandbox")
        return reply({"session_id": session_id, **(await session.sandbox.ping())})

    return app
