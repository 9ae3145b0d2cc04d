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
from ppio_sandbox.agent_runtime.protocol import encode_json

from ._validate import check_session_id, check_timeout_seconds
from .host import Orchestrator
from .session_core import Turn
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


TURNS_DEFAULT = 20
TURNS_MAX = 200
"""``GET /v1/sessions/{id}/turns?limit=``: how many finished turns by default, and at most."""
REPLY_PREVIEW_BYTES = 256
"""How much of a turn's reply (its JSON) the turns view carries."""


def _turn_view(turn: Turn, wall_offset: float) -> dict[str, Any]:
    """A turn as the console shows it: what asked for it, how it ended, its reply's start."""
    started, finished = turn.started_at, turn.finished_at
    if turn.outcome is not None:
        outcome = turn.outcome.value
    else:
        outcome = "running" if started is not None else "queued"
    view: dict[str, Any] = {
        "request_id": turn.request_id,
        "idempotency_key": turn.key,
        "strategy": turn.strategy.value if turn.strategy is not None else None,
        "outcome": outcome,
        "submitted_at": round(turn.submitted_at + wall_offset, 3),
        "started_at": None if started is None else round(started + wall_offset, 3),
        "finished_at": None if finished is None else round(finished + wall_offset, 3),
        "duration": None if started is None or finished is None else round(finished - started, 6),
        "streaming": turn.streaming,
    }
    if turn.streaming:
        view["chunks"] = len(turn.events)
    if turn.error is not None:
        view["error"] = turn.error.to_envelope(turn.request_id)["error"]
        reply: Any = view["error"]
    else:
        reply = turn.events if turn.streaming else turn.result
    if turn.error is not None or turn.streaming or finished is not None:
        try:
            data = encode_json(reply)
        except (TypeError, ValueError, OverflowError):
            data = b'"(a value JSON cannot carry)"'
        view["reply"] = data[:REPLY_PREVIEW_BYTES].decode("utf-8", "ignore")
        view["reply_bytes"] = len(data)
    return view


def _turns_limit(raw: str | None) -> int:
    if raw is None:
        return TURNS_DEFAULT
    if not raw.isdigit() or not 1 <= int(raw) <= TURNS_MAX:
        raise ValidationError(f"limit must be an integer from 1 to {TURNS_MAX}")
    return int(raw)


_SAMPLE = re.compile(r"(ppio_[a-z_]+)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_TURN_FAMILIES = ("ppio_turn", "ppio_sandbox_")


def _metric_figures(metrics: Any) -> dict[str, Any]:
    """This node's turn and sandbox figures, read from what ``GET /metrics`` renders.

    The exposition text is the contract (whatever keeps the counters): turns by
    outcome, the turn-duration histogram (per-bucket counts, the last one
    ``+Inf``), and sandbox starts and crashes by kind.
    """
    if metrics is None:
        return {"turns": None, "sandboxes": None}
    outcomes: dict[str, int] = {}
    starts: dict[str, int] = {}
    crashes: dict[str, int] = {}
    cumulative: list[tuple[float, int]] = []
    seconds = 0.0
    count = 0
    for line in metrics.render().decode().splitlines():
        found = _SAMPLE.match(line) if line.startswith(_TURN_FAMILIES) else None
        if found is None:
            continue
        name, labels_text, value_text = found.groups()
        labels = dict(_LABEL.findall(labels_text or ""))
        value = float(value_text)
        if name == "ppio_turns_total":
            outcomes[labels.get("outcome", "")] = int(value)
        elif name == "ppio_turn_duration_seconds_bucket":
            cumulative.append((float(labels["le"]), int(value)))
        elif name == "ppio_turn_duration_seconds_sum":
            seconds = value
        elif name == "ppio_turn_duration_seconds_count":
            count = int(value)
        elif name in ("ppio_sandbox_starts_total", "ppio_sandbox_crashes_total"):
            by_kind = starts if name == "ppio_sandbox_starts_total" else crashes
            by_kind[labels.get("kind", "")] = int(value)
    cumulative.sort()
    counts = [n - (cumulative[i - 1][1] if i else 0) for i, (_, n) in enumerate(cumulative)]
    return {
        "turns": {
            "by_outcome": outcomes,
            "duration_seconds": {
                "buckets": [bound for bound, _ in cumulative if bound != float("inf")],
                "counts": counts,  # per bucket: one more than the bounds, the last is +Inf
                "sum": seconds,
                "count": count,
            },
        },
        "sandboxes": {"starts": starts, "crashes": crashes},
    }


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

    @app.get("/v1/sessions/<session_id>/turns")
    async def session_turns(session_id: str) -> Response:
        """The session's recent turns, oldest first: the finished ones it still remembers
        (its idempotency cache), then the running one; a crashed turn is not kept."""
        limit = _turns_limit(request.args.get("limit"))
        session = await host.open_session(tenant(), session_id)
        core = session.core
        running = core.running
        return reply(
            {
                "session_id": core.session_id,
                "status": core.state.value,
                "turns": [_turn_view(turn, wall_offset) for turn in core.finished_turns(limit)],
                "running": None if running is None else _turn_view(running, wall_offset),
                "queued": core.queued,
            }
        )

    @app.get("/v1/stats")
    async def stats() -> Response:
        """The caller's sessions by state, and this node's turn and sandbox figures."""
        owner = tenant()
        states: dict[str, int] = {}
        active = running = queued = 0
        for session in host.list_sessions(owner):
            core = session.core
            states[core.state.value] = states.get(core.state.value, 0) + 1
            active += not core.ended
            running += core.running is not None
            queued += core.queued
        return reply(
            {
                "tenant": owner,
                "time": round(time.time(), 3),
                "sessions": {
                    "by_state": states,
                    "active": active,
                    "running_turns": running,
                    "queued_turns": queued,
                },
                "node": {
                    "sessions": len(host.directory),
                    "running_turns": host.running_turns,
                    "accepting": host.accepting,
                },
                **_metric_figures(host.metrics),
            }
        )

    @app.get("/v1/sessions/<session_id>/ping")
    async def ping_session(session_id: str) -> Response:
        session = await host.open_session(tenant(), session_id)
        if session.sandbox is None:
            raise ValidationError(f"session {session_id} has no running sandbox")
        return reply({"session_id": session_id, **(await session.sandbox.ping())})

    return app
