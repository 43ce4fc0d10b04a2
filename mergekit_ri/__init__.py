"""mergekit-ri: merge fine-tuned experts of one base model into one multi-task model.

    import mergekit_ri as m
    result = m.merge("recipe.yaml", "out", options=m.MergeOptions(device="cpu"))

`mergekit_ri.ri_demo()` runs `ri-merge demo --ri` (RI shown on tiny image classifiers).

The API (`merge`, `plan`, `load_recipe`, `MergeOptions`, `MergeEvents`, `MergeResult`) is imported
on first use, so `import mergekit_ri` stays cheap (no torch) for the CLI's fast paths.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from .errors import MergeInterrupted, UserError

__version__ = "0.1.0"

_API = {
    "merge": "api",
    "load_recipe": "api",
    "MergeOptions": "api",
    "PlanReport": "api",
    "MergeEvents": "events",
    "MergeResult": "engine",
    "FileRecord": "io.manifest",
    "content_fingerprint": "io.contenthash",
    "RIStatus": "ri.keys",
    "ri_demo": "demo_ri",
}
__all__ = ["__version__", "UserError", "MergeInterrupted", "plan", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from importlib import import_module

        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CallablePlanModule(ModuleType):
    """`mergekit_ri.plan` is both the planning module and the API's `plan(recipe)`: calling the
    module calls `mergekit_ri.api.plan`, everything else is the module as before."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import plan

        return plan(*args, **kwargs)


class _Package(ModuleType):
    """This package, with `plan` resolved on access: the submodule `mergekit_ri.plan` (imported on
    first use, made callable) — an import of it replaces a package attribute of the same name, so
    a plain function `plan` here would be overwritten by the module the first time it loads."""

    @property
    def plan(self) -> ModuleType:
        from importlib import import_module

        module = import_module(".plan", __name__)
        if not isinstance(module, _CallablePlanModule):
            module.__class__ = _CallablePlanModule
        return module

    @plan.setter
    def plan(self, module: ModuleType) -> None:  # the import system sets it; the getter finds it
        pass


sys.modules[__name__].__class__ = _Package
