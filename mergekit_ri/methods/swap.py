"""NearSwap and Arcee Fusion: keep the base, and take the other model's value only where the
two differ in a telling way (mergekit's `nearswap` and `arcee_fusion`).

NearSwap takes the other model's value where the two are close (|Δ| ≤ t: fully; beyond, with
weight t/|Δ|). Arcee Fusion takes the other model's change where its importance, |Δ| times the KL
divergence of the two rows' softmaxes, is an outlier: ≥ median + 1.5·IQR of the tensor's scores.
"""

from __future__ import annotations

from ..lazy import torch
from . import rules
from .registry import MethodSpec, Param, TensorContext, TensorParams, register
from .slerp import partner


def nearswap_tensors(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """w·other + (1 − w)·base with w = clamp(t / max(|base − other|, 1e-6), 0, 1)."""
    weight = (t / (base - other).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return base + weight * (other - base)


def nearswap(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    return nearswap_tensors(float(p["t"]), base, partner(base, experts))


def fusion_importance(base: torch.Tensor, other: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """|other − base| times KL(softmax(other) ‖ softmax(base)) of each row (last axis)."""
    p = torch.softmax(other, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * kl


def quantile_at(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ⌊q·(n − 1)⌋-th smallest entry (0-based), mergekit's quantile rule, computed exactly."""
    flat = values.reshape(-1)
    return flat.kthvalue(int(q * (flat.numel() - 1)) + 1).values


def arcee_fusion_tensors(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    importance = fusion_importance(base, other)
    q1, median, q3 = (quantile_at(importance, q) for q in (0.25, 0.5, 0.75))
    mask = importance >= median + 1.5 * (q3 - q1)
    return base + (other - base) * mask


def arcee_fusion(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    return arcee_fusion_tensors(base, partner(base, experts))


register(
    MethodSpec(
        "nearswap",
        nearswap,
        (Param("t", 1e-3, False, "distance below which the other model's value is taken whole"),),
        needs_base=True,
        elementwise=True,
        summary="the base, with the other model's values where the two are within t (weight t/|Δ| beyond)",
        citation="alchemonaut, NearSwap (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); mergekit",
        check_recipe=rules.all_of(rules.pair_with_base("nearswap"), rules.requires("nearswap", "t")),
    )
)
register(
    MethodSpec(
        "arcee_fusion",
        arcee_fusion,
        (),
        needs_base=True,
        summary="the base plus the other model's changes whose importance (|Δ|·KL) is an outlier",
        citation="Arcee AI, Arcee Fusion (mergekit's arcee_fusion)",
        check_recipe=rules.pair_with_base("arcee_fusion"),
    )
)

__all__ = ["arcee_fusion", "arcee_fusion_tensors", "fusion_importance", "nearswap", "nearswap_tensors"]
