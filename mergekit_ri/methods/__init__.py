"""Merge methods: a registry of pure tensor functions (see `registry.py` for the interface)."""

from . import arithmetic  # noqa: F401  (registers linear, task_arithmetic, ties, dare_*)
from . import spectral, wudi  # noqa: F401  (registers tsv, iso_c, iso_cts, wudi, wudi2)
from . import passthrough, slerp, sparsify, spherical, stock, swap  # noqa: F401  (mergekit's methods:
#   passthrough, slerp, nuslerp, breadcrumbs(_ties), della(_linear), sce, multislerp, karcher,
#   model_stock, nearswap, arcee_fusion)
from .registry import MethodSpec, Param, TensorContext, TensorParams, all_methods, get_method

__all__ = ["MethodSpec", "Param", "TensorContext", "TensorParams", "all_methods", "get_method"]
