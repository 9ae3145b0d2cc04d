"""An agent behind four middlewares, in registration order.

1. ``require_user`` (the seed snippet): no ``metadata.user_id`` -> 400.
2. ``explode``: ``metadata.explode`` -> a plain ``Exception`` (500).
3. ``rewrite``: ``data.rewrite`` -> the entrypoint sees a replacement request.
4. ``stamp`` wraps the rest of the chain and adds ``x_stamped_by`` to the result.
"""

from __future__ import annotations

from typing import Any

from ppio_sandbox.agent_runtime import (
    InvocationRequest,
    PPIOAgentRuntimeApp,
    RequestContext,
    ValidationError,
)

app = PPIOAgentRuntimeApp()


@app.middleware
async def require_user(context: RequestContext, request: InvocationRequest) -> None:
    if not request.metadata.get("user_id"):
        raise ValidationError("User ID required")


@app.middleware
async def explode(context: RequestContext, request: InvocationRequest) -> None:
    if request.metadata.get("explode"):
        raise Exception("middleware blew up")


@app.middleware
async def rewrite(context: RequestContext, request: InvocationRequest) -> Any:
    if request.data.get("rewrite"):
        return InvocationRequest(
            prompt=f"rewritten: {request.prompt}",
            metadata=request.metadata,
            extra={"rewritten": True},
        )
    return None


@app.middleware
async def stamp(context: RequestContext, request: InvocationRequest, call_next: Any) -> Any:
    result = await call_next(request)
    return {**result, "x_stamped_by": "stamp", "x_request_id": context.request_id}


@app.entrypoint
async def agent(request: dict[str, Any], context: RequestContext) -> dict[str, Any]:
    return {"seen": request, "user_id": context.metadata.get("user_id")}
