"""Loading an agent file and finding the runtime app it defines."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .app import PPIOAgentRuntimeApp

__all__ = ["find_app", "load_agent_module"]


def load_agent_module(path: str | Path, module_name: str | None = None) -> ModuleType:
    """Import the agent file at ``path`` under its own module name.

    The file's directory goes first on ``sys.path`` so its sibling modules
    import; ``if __name__ == "__main__"`` blocks do not run.
    """
    file = Path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"agent file not found: {path}")
    name = module_name or f"ppio_agent_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def find_app(module: ModuleType, attribute: str | None = None) -> PPIOAgentRuntimeApp:
    """The app named ``attribute``, else the module's only runtime app."""
    if attribute:
        app: Any = getattr(module, attribute, None)
        if not isinstance(app, PPIOAgentRuntimeApp):
            raise LookupError(f"{module.__file__}: {attribute!r} is not a PPIOAgentRuntimeApp")
        return app
    apps = {id(v): v for v in vars(module).values() if isinstance(v, PPIOAgentRuntimeApp)}
    if len(apps) != 1:
        found = "none" if not apps else f"{len(apps)} of them"
        raise LookupError(
            f"{module.__file__}: expected one PPIOAgentRuntimeApp at module level, found {found}; "
            "name it with --app"
        )
    return next(iter(apps.values()))
