"""The client's commands of ``ppio-sandbox-cli``: agents and sessions on a running orchestrator.

::

    ppio-sandbox-cli agent deploy --config .ppio-agent.yaml [--no-wait] [--timeout S]
    ppio-sandbox-cli agent invoke --template-id ID --input TEXT [--session-id S] [--stream]
    ppio-sandbox-cli agent list
    ppio-sandbox-cli session list
    ppio-sandbox-cli session close ID

Every command takes ``--json`` (one JSON document on stdout; a streamed
invocation prints one JSON line per chunk), ``--base-url``, ``--api-key``,
``--api-secret`` (else ``$PPIO_BASE_URL``, ``$PPIO_API_KEY``,
``$PPIO_API_SECRET``) and ``--backend asyncio|trio``. Progress goes to
stderr. A failure prints one line, ``error: <ErrorClass>: <message>``, and
exits 1; a usage error exits 2; Ctrl-C exits 130.

:func:`add_commands` registers the commands into the parser of
:mod:`ppio_sandbox.orchestrator.cli`, which imports this module only for
them (``serve`` never imports the client); :func:`run` runs the one parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
import yaml

from ppio_sandbox.agent_runtime.errors import (
    InvocationTimeoutError,
    PPIOAgentRuntimeError,
    ValidationError,
)
from ppio_sandbox.agent_runtime.packaging import AGENT_FILE, pack_directory

from ._agent_yaml import write_status
from ._client import AgentRuntimeClient
from ._config import ClientConfig
from ._models import AgentTemplate, RequestLike, SessionInfo

__all__ = ["add_commands", "run"]

Handler = Callable[[AgentRuntimeClient, argparse.Namespace, "Output"], Awaitable[int]]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
_Item = TypeVar("_Item")

#: Lines of a failed build's log shown on stderr.
LOG_TAIL_LINES = 20
_POLL_FIRST = 0.05
_POLL_MAX = 0.25


# -- output -------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    return msgspec.to_builtins(value, builtin_types=(), str_keys=True)


class Output:
    """Results on stdout (JSON or human text), progress and notes on stderr.

    Streams are looked up at every write, so redirecting ``sys.stdout``
    (pytest's capture, ``contextlib.redirect_stdout``) works.
    """

    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode
        self._open_status = False

    def document(self, value: Any) -> None:
        """One JSON document on stdout."""
        print(json.dumps(_jsonable(value), indent=2, ensure_ascii=False), flush=True)

    def json_line(self, value: Any) -> None:
        print(json.dumps(_jsonable(value), ensure_ascii=False), flush=True)

    def text(self, text: str) -> None:
        print(text, flush=True)

    def value(self, value: Any) -> None:
        """A result for a person: a string as it is, anything else as indented JSON."""
        if isinstance(value, str):
            self.text(value)
        else:
            self.document(value)

    def note(self, text: str) -> None:
        """A line of progress on stderr."""
        self.end_status()
        print(text, file=sys.stderr, flush=True)

    def status(self, text: str, *, changed: bool) -> None:
        """A status line: redrawn in place on a terminal, else printed when ``changed``."""
        stream = sys.stderr
        if stream.isatty():
            stream.write("\r\033[K" + text)
            stream.flush()
            self._open_status = True
        elif changed:
            print(text, file=stream, flush=True)

    def end_status(self) -> None:
        if self._open_status:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._open_status = False


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _listing(
    out: Output,
    name: str,
    items: Sequence[_Item],
    headers: Sequence[str],
    row: Callable[[_Item], Sequence[str]],
) -> int:
    """Show a ``list`` command's result: a table of ``row(item)``, ``no <name>``, or JSON.

    With ``--json`` the items are one document, ``{name: items}``; ``row``
    is used only for the table.
    """
    if out.json:
        out.document({name: items})
    elif not items:
        out.text(f"no {name}")
    else:
        out.text(_table(headers, [row(item) for item in items]))
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def _span(seconds: float) -> str:
    """``42s``, ``3m``, ``2h``, ``5d`` (negative: ``-``)."""
    if seconds < 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


# -- agent deploy -------------------------------------------------------------


def _locate(config: Path) -> tuple[Path, Path]:
    """``(agent directory, its .ppio-agent.yaml)`` from ``--config`` (the file or its directory)."""
    agent_file = config / AGENT_FILE if config.is_dir() else config
    if not agent_file.is_file():
        raise ValidationError(f"{agent_file}: no such file (--config names a {AGENT_FILE})")
    return agent_file.parent, agent_file


def _pack_and_count(directory: Path) -> tuple[int, int]:
    """``(archive bytes, files)`` of what deploying ``directory`` uploads."""
    archive = pack_directory(directory)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        files = sum(1 for member in tar.getmembers() if not member.isdir())
    return len(archive), files


def _log_tail(template: AgentTemplate) -> str:
    lines = (template.build_log or "").rstrip().splitlines()[-LOG_TAIL_LINES:]
    if not lines:
        return f"build log: (empty){'; error: ' + template.error if template.error else ''}"
    return "\n".join([f"build log (last {len(lines)} lines):", *(f"  | {line}" for line in lines)])


async def _wait_settled(
    client: AgentRuntimeClient, template: AgentTemplate, out: Output, deadline: float, budget: float
) -> AgentTemplate:
    """Poll ``template`` until deployed or failed, showing its phase and the time spent."""
    started = anyio.current_time()
    delay, shown = _POLL_FIRST, ""
    while True:
        elapsed = anyio.current_time() - started
        out.status(
            f"template {template.template_id}: {template.phase} ({elapsed:.1f} s)",
            changed=template.phase != shown,
        )
        shown = template.phase
        if template.settled:
            out.end_status()
            return template
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            out.end_status()
            raise InvocationTimeoutError(
                f"template {template.template_id} is still {template.phase} after {budget:g} s"
            )
        await anyio.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX)
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0.001)):
            template = await client.get_template(template.template_id, refresh=True)


async def _deploy(client: AgentRuntimeClient, args: argparse.Namespace, out: Output) -> int:
    directory, agent_file = _locate(args.config)
    budget = args.timeout if args.timeout is not None else client.config.deploy_timeout
    deadline = anyio.current_time() + budget
    out.note(f"packing {directory}")
    size, files = await anyio.to_thread.run_sync(_pack_and_count, directory)
    out.note(f"uploading {files} files, {_size(size)} to {client.config.base_url}")
    template = await client.deploy_template(directory, wait=False, timeout=budget)
    if not args.no_wait:
        template = await _wait_settled(client, template, out, deadline, budget)
    report: dict[str, Any] = {"config": str(agent_file), "template": template, "status": None}
    if template.phase == "failed":
        out.note(_log_tail(template))
        if out.json:
            out.document(report)
        raise ValidationError(f"template {template.template_id} failed to deploy: {template.error}")
    if template.deployed:
        status = {
            "phase": template.phase,
            "template_id": template.template_id,
            "last_deployed": _iso(template.updated_at or time.time()),
            "build_id": template.digest,
        }
        kept = await anyio.to_thread.run_sync(write_status, agent_file, status)
        report.update(status=status, comments_kept=kept)
        if not kept:
            out.note(
                f"note: {agent_file} was rewritten from its parsed content; comments were lost"
            )
    if out.json:
        out.document(report)
    elif template.deployed:
        out.text(
            f"deployed {template.template_id} ({template.name} {template.version}); "
            f"status written to {agent_file}"
        )
    else:
        out.text(f"uploaded {template.template_id}: {template.phase} (not waiting)")
    return 0


# -- agent invoke / list ------------------------------------------------------


async def _invoke(client: AgentRuntimeClient, args: argparse.Namespace, out: Output) -> int:
    request: RequestLike = args.input_json if args.input_json is not None else args.input
    if args.stream:
        chunks = client.stream_agent(
            args.template_id, request, session_id=args.session_id, timeout=args.timeout
        )
        async with chunks:
            async for chunk in chunks:
                if out.json:
                    out.json_line(chunk)
                else:
                    out.text(chunk if isinstance(chunk, str) else json.dumps(_jsonable(chunk)))
                await anyio.lowlevel.checkpoint()
        return 0
    response = await client.invoke_agent(
        args.template_id, request, session_id=args.session_id, timeout=args.timeout
    )
    if out.json:
        out.document(response)
    else:
        out.value(response.result)
    return 0


async def _list_templates(client: AgentRuntimeClient, args: argparse.Namespace, out: Output) -> int:
    templates = await client.list_templates(refresh=True)
    now = time.time()

    def row(t: AgentTemplate) -> Sequence[str]:
        return (
            t.template_id,
            t.name,
            t.version,
            t.phase,
            str((t.spec.get("sandbox") or {}).get("kind", "")),
            _span(now - t.updated_at) + " ago" if t.updated_at else "-",
        )

    headers = ("TEMPLATE ID", "NAME", "VERSION", "PHASE", "SANDBOX", "UPDATED")
    return _listing(out, "templates", templates, headers, row)


# -- session list / close -----------------------------------------------------


async def _list_sessions(client: AgentRuntimeClient, args: argparse.Namespace, out: Output) -> int:
    sessions = [session.info for session in await client.list_sessions()]
    now = time.time()

    def row(s: SessionInfo) -> Sequence[str]:
        return (
            s.session_id,
            s.template_id,
            s.status,
            str(s.turns.get("ok", 0) + s.turns.get("failed", 0)),
            _span(now - s.created_at),
            _span(now - s.last_activity),
            _span(s.expires_at - now) if s.expires_at is not None else "-",
        )

    headers = ("SESSION ID", "TEMPLATE", "STATUS", "TURNS", "AGE", "IDLE", "EXPIRES IN")
    return _listing(out, "sessions", sessions, headers, row)


async def _close_session(client: AgentRuntimeClient, args: argparse.Namespace, out: Output) -> int:
    # Ask first: closing an unknown id must say so (a typo), not succeed quietly.
    session = await client.get_session(args.session_id)
    await session.close()
    if out.json:
        out.document({"session_id": session.session_id, "closed": True, "status": session.status})
    else:
        out.text(f"closed {session.session_id}")
    return 0


# -- parsing ------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"prompt": "hi"}\'')
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    group.add_argument(
        "--base-url", help="the orchestrator (default $PPIO_BASE_URL, else http://127.0.0.1:8900)"
    )
    group.add_argument("--api-key", help="API key (default $PPIO_API_KEY); alone, a Bearer token")
    group.add_argument(
        "--api-secret", help="API secret (default $PPIO_API_SECRET): sign requests (HMAC)"
    )
    group.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help="event loop"
    )
    return common


def add_commands(sub: SubParsers) -> None:
    """Add ``agent`` and ``session`` to the ``ppio-sandbox-cli`` subcommands ``sub``."""
    common = _common()
    agent = sub.add_parser("agent", help="deploy, invoke and list agents on an orchestrator")
    agents = agent.add_subparsers(dest="agent_command", required=True)

    deploy = agents.add_parser(
        "deploy", parents=[common], help="upload an agent directory and wait for its build"
    )
    deploy.add_argument(
        "--config",
        type=Path,
        default=Path(AGENT_FILE),
        help=f"the agent's {AGENT_FILE} (its directory is uploaded; default ./{AGENT_FILE})",
    )
    deploy.add_argument("--no-wait", action="store_true", help="return once uploaded")
    deploy.add_argument("--timeout", type=_positive, help="seconds to wait for the build")
    deploy.set_defaults(handler=_deploy)

    invoke = agents.add_parser("invoke", parents=[common], help="run one turn of an agent")
    invoke.add_argument("--template-id", required=True, help="template id or agent name")
    body = invoke.add_mutually_exclusive_group(required=True)
    body.add_argument("--input", help="the prompt")
    body.add_argument(
        "--input-json", type=_json_object, metavar="JSON", help="the whole request body"
    )
    invoke.add_argument(
        "--session-id", help="run in this session (created on first use, kept after)"
    )
    invoke.add_argument("--stream", action="store_true", help="print chunks as they arrive")
    invoke.add_argument("--timeout", type=_positive, help="seconds before giving up")
    invoke.set_defaults(handler=_invoke)

    listing = agents.add_parser("list", parents=[common], help="list the templates")
    listing.set_defaults(handler=_list_templates)

    session = sub.add_parser("session", help="list and close sessions on an orchestrator")
    sessions = session.add_subparsers(dest="session_command", required=True)
    sessions.add_parser("list", parents=[common], help="list live sessions").set_defaults(
        handler=_list_sessions
    )
    close = sessions.add_parser("close", parents=[common], help="close a session")
    close.add_argument("session_id", metavar="ID")
    close.set_defaults(handler=_close_session)


# -- running ------------------------------------------------------------------


async def _main(handler: Handler, args: argparse.Namespace) -> int:
    config = ClientConfig(base_url=args.base_url) if args.base_url else ClientConfig()
    out = Output(args.json)
    try:
        async with AgentRuntimeClient(args.api_key, args.api_secret, config) as client:
            return await handler(client, args, out)
    finally:
        out.end_status()


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        interrupts = [e for e in exc.exceptions if isinstance(e, KeyboardInterrupt)]
        exc = interrupts[0] if interrupts else exc.exceptions[0]
    return exc


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; the process's exit code."""
    handler: Handler = args.handler
    try:
        return anyio.run(_main, handler, args, backend=args.backend)
    except BaseException as exc:  # sorted below; the rest is re-raised
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            print("interrupted", file=sys.stderr, flush=True)
            return 130
        if isinstance(leaf, BrokenPipeError):  # `... | head`: the reader has had enough
            _silence_stdout()
            return 1
        if isinstance(leaf, PPIOAgentRuntimeError | OSError | ValueError | yaml.YAMLError):
            message = " ".join(str(leaf).split()) or "(no message)"
            print(f"error: {type(leaf).__name__}: {message}", file=sys.stderr, flush=True)
            return 1
        raise
