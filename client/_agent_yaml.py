"""Writing a deploy's ``status`` back into ``.ppio-agent.yaml``, keeping the rest.

``ppio-sandbox-cli agent deploy`` records what it deployed, as the original
PPIO CLI does::

    status:
      phase: deployed
      template_id: assistant-1a2b3c4d
      last_deployed: '2026-11-25T14:55:02+00:00'
      build_id: 1a2b3c4d...

The file is edited as text: the top-level ``status:`` block is replaced where
it stands (or appended), so the user's other keys, their order and their
comments survive. The edit is checked by parsing the result; if the text cut
cannot be proved right (a flow-style document, several documents...), the
file is rewritten from its parsed content instead, which loses comments.
Parsing goes through :func:`~ppio_sandbox.agent_runtime.packaging.load_agent_yaml`,
the orchestrator's hardened loader (no anchors or aliases, bounded size and
nesting), so a file the orchestrator would refuse is refused here too.
:func:`pack_directory` leaves the ``status`` block out of the archive, so
writing it never changes a template's content hash.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ppio_sandbox.agent_runtime.errors import ValidationError
from ppio_sandbox.agent_runtime.packaging import load_agent_yaml

__all__ = ["replace_status", "write_status"]

_STATUS_KEY = re.compile(r"""^(status|"status"|'status')\s*:""")


def _status_span(lines: list[str]) -> tuple[int, int] | None:
    """``(start, end)`` of the top-level ``status:`` block's lines, if there is one.

    Blank and comment lines after the block's last indented line belong to
    what follows (a comment introducing the next key stays).
    """
    start = next((i for i, line in enumerate(lines) if _STATUS_KEY.match(line)), None)
    if start is None:
        return None
    end = start + 1
    for i in range(start + 1, len(lines)):
        line = lines[i]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[:1] not in (" ", "\t"):
            break
        end = i + 1
    return start, end


def replace_status(text: str, status: Mapping[str, Any]) -> tuple[str, bool]:
    """``text`` with its ``status`` block set to ``status``; and whether the layout was kept.

    >>> doc = "# my agent\\nkind: Agent  # keep me\\nstatus:\\n  phase: failed\\n"
    >>> print(replace_status(doc, {"phase": "deployed"})[0], end="")
    # my agent
    kind: Agent  # keep me
    status:
      phase: deployed
    """
    before = load_agent_yaml(text) if text.strip() else {}
    if not isinstance(before, dict):
        raise ValueError("the agent file is not a YAML mapping")
    expected = {key: value for key, value in before.items() if key != "status"}
    expected["status"] = dict(status)
    block = yaml.safe_dump(
        {"status": dict(status)}, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    lines = text.splitlines(keepends=True)
    span = _status_span(lines)
    if span is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(block)
    else:
        lines[span[0] : span[1]] = [block]
    edited = "".join(lines)
    try:
        kept = load_agent_yaml(edited) == expected
    except ValidationError:
        kept = False
    if kept:
        return edited, True
    return yaml.safe_dump(expected, sort_keys=False, allow_unicode=True), False


def write_status(path: Path, status: Mapping[str, Any]) -> bool:
    """Set ``status`` in the agent file at ``path`` (atomically); True if comments were kept."""
    text, kept = replace_status(path.read_text(encoding="utf-8"), status)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        scratch.write_text(text, encoding="utf-8")
        os.chmod(scratch, path.stat().st_mode & 0o7777)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    return kept
