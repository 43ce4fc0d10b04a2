"""Merge methods: a registry of pure tensor functions (see `registry.py` for the interface)."""

from . import (  # noqa: F401  (each module registers its methods)
    arithmetic,  # linear, task_arithmetic, ties, dare_linear, dare_ties
    passthrough,  # passthrough
    ram,  # ram, ramplus_tl
    slerp,  # slerp, nuslerp
    sparsify,  # breadcrumbs(_ties), della(_linear), sce
    spectral,  # tsv, iso_c, iso_cts
    spherical,  # multislerp, karcher
    stock,  # model_stock
    swap,  # nearswap, arcee_fusion
    wudi,  # wudi, wudi2
)
from .registry import MethodSpec, Param, TensorContext, TensorParams, all_methods, get_method

__all__ = ["MethodSpec", "Param", "TensorContext", "TensorParams", "all_methods", "get_method"]
