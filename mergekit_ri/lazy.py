"""`torch`, imported on its first use, for the modules that the torch-free commands load.

`ri-merge --help`, `version`, `methods`, `validate` and `--dry-run` read YAML and safetensors
headers only, yet they load the method modules (whose parameters `methods` prints and `validate`
checks) and the planner, which are written against torch; importing torch takes 1.5-5 s, ten
times the rest of such a command. These modules write `from .lazy import torch` instead of
`import torch`: a stand-in that imports torch on the first attribute access (a tensor touched).
Then every module's global `torch` (`mergekit_ri.lazy.torch` itself included) still bound to
the stand-in is rebound to the real module, so from there on those modules hold torch exactly as
`import torch` would have given it, at no cost per access. `torch` is not in `sys.modules` until then, and
type checkers see the real module. `np` does the same for numpy.

Rules for the modules that use it: no `torch.` at import time (module constants, default
arguments, dataclass defaults: use a `default_factory`, quote type aliases); annotations are
free under `from __future__ import annotations`.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__all__ = ["LazyModule", "np", "torch"]


class LazyModule(ModuleType):
    """A module imported on the first attribute access, which then takes this stand-in's place
    as a global of every loaded module that bound it under `bound_as` (`from .lazy import torch`,
    `from .lazy import np`); an access through any other reference is forwarded."""

    def __init__(self, name: str, bound_as: str | None = None) -> None:
        super().__init__(name)
        self._bound_as = bound_as or name.rpartition(".")[2]  # the global name it is imported as

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # copy, pickle, inspect probing: no import
            raise AttributeError(name)
        module = sys.modules.get(self.__name__) or importlib.import_module(self.__name__)
        self._replace_with(module)
        return getattr(module, name)

    def _replace_with(self, module: ModuleType) -> None:
        for loaded in list(sys.modules.values()):
            namespace = getattr(loaded, "__dict__", None)
            if isinstance(namespace, dict) and namespace.get(self._bound_as) is self:
                namespace[self._bound_as] = module

    def __repr__(self) -> str:
        loaded = "loaded" if self.__name__ in sys.modules else "not imported yet"
        return f"<lazy module {self.__name__!r} ({loaded})>"


if TYPE_CHECKING:
    import numpy as np
    import torch
else:
    torch = LazyModule("torch")
    np = LazyModule("numpy", bound_as="np")  # vocab/: ~0.1 s to import, for tensors re-laid by rows
