"""Loading an agent file and finding the runtime app it defines.

Two ways to load an agent file:

* :func:`load_agent_module`, for a process of its own (``python -m
  ppio_sandbox.agent_runtime agent.py``, process sandboxes): as ``python
  agent.py`` would, the file's directory goes first on ``sys.path``, so its
  sibling modules import by their plain names.
* :func:`load_isolated`, for many agents in one process (the orchestrator's
  in-process sandboxes): the file's directory becomes a package of its own
  under a unique name (``ppio_tpl_<id>_<digest>``), the file one of its
  modules, and ``sys.path`` is left alone. The template's code still imports
  its sibling files by their plain names (``import helpers``, ``from pkg
  import x``) -- at load time or lazily inside a turn -- and gets its own
  copies: each module of the package has an ``__import__`` of its own (in
  its ``__builtins__``) that resolves a top-level name found in the
  template's directory to ``<package>.<name>``. Every other name, and every
  import made by code outside the template, resolves as usual, so two
  templates with a ``helpers.py`` each, or two versions of one template,
  never see each other's modules. ``importlib.import_module("helpers")`` is
  not rewritten; ``importlib.import_module(".helpers", __package__)`` is the
  portable spelling.
"""

from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import importlib.resources.abc
import importlib.util
import keyword
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .app import PPIOAgentRuntimeApp

__all__ = ["find_app", "load_agent_module", "load_isolated"]


def load_agent_module(path: str | Path, module_name: str | None = None) -> ModuleType:
    """Import the agent file at ``path`` under its own module name, for a process of its own.

    The file's directory goes first on ``sys.path`` so its sibling modules
    import; ``if __name__ == "__main__"`` blocks do not run. Several agents
    sharing one process use :func:`load_isolated` instead.
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


def load_isolated(path: str | Path, package: str) -> ModuleType:
    """Import the agent file at ``path`` as a module of a package of its own.

    ``package`` names the package (made a valid identifier, and unique: a
    name already in use gets a ``_2``, ``_3``... suffix); the file's
    directory is its ``__path__``; the file is ``<package>.<stem>``. See the
    module docstring for how its sibling imports resolve. ``sys.path`` is
    not touched; a file that fails to import leaves nothing behind.
    """
    file = Path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"agent file not found: {path}")
    namespace = _Namespace.create(file.parent, package)
    stem = file.stem
    leaf = stem if stem.isidentifier() and not keyword.iskeyword(stem) else "__agent__"
    name = f"{namespace.package}.{leaf}"
    loader = _SourceLoader(name, str(file), namespace.builtins)
    spec = importlib.util.spec_from_file_location(name, file, loader=loader)
    if spec is None:  # pragma: no cover - a loader was given
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        namespace.forget()
        raise
    setattr(sys.modules[namespace.package], leaf, module)
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


# -- isolated loading ---------------------------------------------------------------------------

_LOCK = threading.Lock()
_NAMESPACES: dict[str, _Namespace] = {}
"""Every isolated template package, by its (unique) name."""


class _Namespace:
    """One loaded template: its package, its directory, and the import its code uses."""

    __slots__ = ("builtins", "local", "package", "root")

    def __init__(self, package: str, root: Path) -> None:
        self.package = package
        self.root = str(root)
        self.local: dict[str, bool] = {}  # top-level name -> is it a file of the template?
        self.builtins: dict[str, Any] = dict(vars(builtins))
        self.builtins["__import__"] = self.import_

    @classmethod
    def create(cls, root: Path, requested: str) -> _Namespace:
        """Register a new package (a unique name) whose ``__path__`` is ``root``."""
        base = re.sub(r"[^A-Za-z0-9_]", "_", requested) or "ppio_tpl"
        if not base.isidentifier() or keyword.iskeyword(base):
            base = f"_{base}"
        with _LOCK:
            name, n = base, 1
            while name in sys.modules or name in _NAMESPACES:
                n += 1
                name = f"{base}_{n}"
            namespace = cls(name, root)
            spec = importlib.machinery.ModuleSpec(name, _PackageLoader(root), is_package=True)
            spec.submodule_search_locations = [str(root)]
            package = importlib.util.module_from_spec(spec)
            package.__doc__ = f"agent template loaded from {root}"
            sys.modules[name] = package
            _NAMESPACES[name] = namespace
            if _TemplateFinder not in sys.meta_path:
                sys.meta_path.insert(0, _TemplateFinder)
        return namespace

    def forget(self) -> None:
        """Drop the package and every module imported into it (a load that failed)."""
        prefix = self.package + "."
        with _LOCK:
            _NAMESPACES.pop(self.package, None)
            for name in [n for n in sys.modules if n == self.package or n.startswith(prefix)]:
                sys.modules.pop(name, None)

    def import_(
        self,
        name: str,
        globals: dict[str, Any] | None = None,
        locals: Any = None,
        fromlist: Sequence[str] | None = (),
        level: int = 0,
    ) -> ModuleType:
        """``__import__`` for the template's code: its own files first, then the world."""
        if level == 0 and name:
            top = name.partition(".")[0]
            local = self.local.get(top)
            if local is None:
                local = self.local[top] = self._is_local(top)
            if local:
                qualified = f"{self.package}.{name}"
                module = builtins.__import__(qualified, globals, locals, fromlist, 0)
                return module if fromlist else sys.modules[f"{self.package}.{top}"]
        return builtins.__import__(name, globals, locals, fromlist, level)

    def _is_local(self, top: str) -> bool:
        if top in _NAMESPACES:
            return False
        spec = importlib.machinery.PathFinder.find_spec(top, [self.root])
        if spec is None:
            return False
        if spec.origin is not None:
            return True  # a module or a package (with __init__.py) of the template
        # A folder without __init__.py: the template's unless something installed has the name.
        if top in sys.modules:
            return False
        try:
            elsewhere = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return False
        return elsewhere is None or elsewhere.origin is None


class _PackageLoader(importlib.abc.Loader):
    """The template package itself: no code of its own; its files are its resources."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def exec_module(self, module: ModuleType) -> None:
        return None

    def get_resource_reader(self, fullname: str) -> importlib.resources.abc.TraversableResources:
        return _PackageFiles(self.root)


class _PackageFiles(importlib.resources.abc.TraversableResources):
    def __init__(self, root: Path) -> None:
        self.root = root

    def files(self) -> Path:
        return self.root


class _SourceLoader(importlib.machinery.SourceFileLoader):
    """A template module's loader: its code runs with the template's ``__import__``."""

    def __init__(self, fullname: str, path: str, namespace_builtins: dict[str, Any]) -> None:
        super().__init__(fullname, path)
        self.namespace_builtins = namespace_builtins

    def exec_module(self, module: ModuleType) -> None:
        module.__dict__["__builtins__"] = self.namespace_builtins
        super().exec_module(module)


class _SourcelessLoader(importlib.machinery.SourcelessFileLoader):
    """As :class:`_SourceLoader`, for a module shipped as ``.pyc`` only."""

    def __init__(self, fullname: str, path: str, namespace_builtins: dict[str, Any]) -> None:
        super().__init__(fullname, path)
        self.namespace_builtins = namespace_builtins

    def exec_module(self, module: ModuleType) -> None:
        module.__dict__["__builtins__"] = self.namespace_builtins
        super().exec_module(module)


class _TemplateFinder:
    """Finds the modules of isolated template packages, with the template's loaders.

    First on ``sys.meta_path``; answers only for names under a registered
    template package (one dict lookup for any other import).
    """

    @classmethod
    def find_spec(
        cls,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        package, dot, _ = fullname.partition(".")
        if not dot:
            return None
        namespace = _NAMESPACES.get(package)
        if namespace is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.origin is not None:
            loader = spec.loader
            if type(loader) is importlib.machinery.SourceFileLoader:
                spec.loader = _SourceLoader(fullname, spec.origin, namespace.builtins)
            elif type(loader) is importlib.machinery.SourcelessFileLoader:
                spec.loader = _SourcelessLoader(fullname, spec.origin, namespace.builtins)
        return spec

    @classmethod
    def invalidate_caches(cls) -> None:
        return None
