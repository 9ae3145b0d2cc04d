"""Where a template's code may run: in the orchestrator's own process, or not.

In-process code shares the orchestrator's memory (every session, every
tenant's data, its keys), so it runs in process only when the operator
trusts it:

* a template the operator registered (``serve --template DIR``) runs as its
  spec asks: ``inprocess`` (the default) or ``process``;
* a tenant's upload (``POST /v1/templates``) that asks for ``inprocess``, or
  names no kind, runs as a ``process`` sandbox -- unless the orchestrator was
  started with ``serve --trust-uploads``.

The decision is made per template content (id and digest): an upload whose
content is byte for byte a template the operator registered is that
template, and runs as it does. :meth:`SandboxPolicy.decide` is the one place
that decides; the template's API view shows its answer (``"sandbox"``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["SandboxDecision", "SandboxPolicy", "decide_sandbox"]

REQUESTED = "the template's spec.sandbox.kind"
OPERATOR = "registered by the operator (serve --template): in-process allowed"
TRUSTED_UPLOADS = "serve --trust-uploads: uploads may run in-process"
UPLOADS_AS_PROCESS = "uploads run as process sandboxes; serve --trust-uploads allows in-process"


class SandboxDecision(NamedTuple):
    """The sandbox kind a template runs in, the kind its spec asks for, and why."""

    kind: str
    requested: str
    reason: str

    def view(self) -> dict[str, Any]:
        return {"kind": self.kind, "requested": self.requested, "reason": self.reason}


def decide_sandbox(requested: str, *, operator: bool, trust_uploads: bool) -> SandboxDecision:
    """The sandbox kind for a template asking for ``requested``.

    >>> decide_sandbox("inprocess", operator=False, trust_uploads=False).kind
    'process'
    >>> decide_sandbox("inprocess", operator=True, trust_uploads=False).kind
    'inprocess'
    """
    if requested != "inprocess":
        return SandboxDecision(requested, requested, REQUESTED)
    if operator:
        return SandboxDecision("inprocess", requested, OPERATOR)
    if trust_uploads:
        return SandboxDecision("inprocess", requested, TRUSTED_UPLOADS)
    return SandboxDecision("process", requested, UPLOADS_AS_PROCESS)


class SandboxPolicy:
    """The operator's trust: which template contents it registered, and whether uploads count."""

    def __init__(self, *, trust_uploads: bool = False) -> None:
        self.trust_uploads = trust_uploads
        self._vouched: set[tuple[str, str]] = set()

    def vouch(self, template: Any) -> None:
        """The operator registered this template (``serve --template``)."""
        self._vouched.add((template.id, template.digest))

    def decide(self, template: Any) -> SandboxDecision:
        """Where ``template`` runs (see the module docstring)."""
        return decide_sandbox(
            template.spec.sandbox.kind,
            operator=(template.id, template.digest) in self._vouched,
            trust_uploads=self.trust_uploads,
        )
