"""Merge methods: a registry of pure tensor functions (see `registry.py` for the interface)."""

from . import (  # noqa: F401  (registers tsv, iso_c, iso_cts, wudi, wudi2)  # noqa: F401  (mergekit's methods:
    arithmetic,  # noqa: F401  (registers linear, task_arithmetic, ties, dare_*)
    passthrough,
    slerp,
    sparsify,
    spectral,
    spherical,
    stock,
    swap,
    wudi,
)

#   passthrough, slerp, nuslerp, breadcrumbs(_ties), della(_linear), sce, multislerp, karcher,
#   model_stock, nearswap, arcee_fusion)
from .registry import MethodSpec, Param, TensorContext, TensorParams, all_methods, get_method

__all__ = ["MethodSpec", "Param", "TensorContext", "TensorParams", "all_methods", "get_method"]
