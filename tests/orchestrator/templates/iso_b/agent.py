"""Issue 11 item 4: an agent whose sibling modules have the same names in iso_a and iso_b.

Every module says whose it is (``WHO``). ``helpers`` and ``pkg.x`` are imported
when the template loads; ``lazy_helper`` and ``pkg.sub.deep`` only inside a
turn; ``late`` only when a request asks for it.
"""

import helpers
from pkg import x as pkg_x

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp()


@app.entrypoint
async def agent(request: dict) -> dict:
    import json

    import anyio
    import lazy_helper
    import msgspec
    from pkg.sub import deep

    found = {
        "helpers": helpers.WHO,
        "lazy_helper": lazy_helper.WHO,
        "pkg": pkg_x.PACKAGE,
        "pkg.x": pkg_x.WHO,
        "pkg.x->helpers": pkg_x.HELPERS,
        "pkg.sub.deep": deep.WHO,
    }
    if request.get("late"):
        import late

        found["late"] = late.WHO
    return {
        "who": found,
        "module": helpers.__name__,
        "json": json.__name__,
        "anyio": anyio.__name__,
        "msgspec": msgspec.__name__,
        "roundtrip": msgspec.json.decode(json.dumps({"n": 1}).encode()),
    }
