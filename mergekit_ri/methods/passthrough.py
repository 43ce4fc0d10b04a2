"""Passthrough: one model's tensors as they are, optionally scaled (mergekit's `passthrough`).

Its use in mergekit is with slices (stacking layers of several models, "frankenmerges"); over a
whole model it copies one model, each tensor times its per-model `scale`.
"""

from __future__ import annotations

from ..lazy import torch
from . import rules
from .registry import MethodSpec, Param, TensorContext, TensorParams, register


def passthrough(
    base: torch.Tensor | None, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    """The one model (the base when it is listed as that model), times `scale`."""
    tensor = experts[0] if experts.shape[0] else base
    scale = p.per_model["scale"][0] if p.per_model["scale"] else 1.0
    return tensor * scale if scale != 1.0 else tensor


register(
    MethodSpec(
        "passthrough",
        passthrough,
        (Param("scale", 1.0, True, "multiplies the model's tensors (mergekit: no scaling when unset)"),),
        needs_base=False,
        elementwise=True,
        summary="one model's tensors unchanged, or times a per-model scale",
        citation="mergekit's passthrough (arcee-ai/mergekit)",
        check_recipe=rules.exactly("passthrough", 1, base="none"),
    )
)

__all__ = ["passthrough"]
