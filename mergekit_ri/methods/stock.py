"""Model Stock: average the fine-tunes, then pull the average toward the base by how much the
fine-tunes agree.

Jang et al. (arXiv:2403.19522) show that fine-tuned weights lie on a thin shell around a centre;
with the angle θ between task vectors, the point of the segment base→average nearest that centre
is t = k·cos θ / (1 + (k − 1)·cos θ) of the way (k fine-tunes). As in mergekit, cos θ is the mean
over pairs of task vectors, per tensor, or per row with `filter_wise` (a 1-D tensor is one row).
"""

from __future__ import annotations

from ..lazy import torch
from . import rules
from .geometry import dot64, norm64
from .registry import MethodSpec, Param, TensorContext, TensorParams, register


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products, accumulated in float64 (the fp32 products are one tensor's size)."""
    return (a * b).sum(dim=-1, keepdim=True, dtype=torch.float64)


def mean_pairwise_cosine(deltas: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """cos θ averaged over pairs of [k, ...] task vectors: a scalar, or [rows, 1] per row. Norm
    products are clamped at 1e-6 and cosines to [−1, 1], as mergekit does."""
    k = deltas.shape[0]
    total = torch.zeros(deltas.shape[1] if filter_wise else 1, 1, dtype=torch.float64, device=deltas.device)
    norms = [norm64(d) for d in deltas] if not filter_wise else []  # once per task vector, not per pair
    for i in range(k):
        for j in range(i + 1, k):
            if filter_wise:
                a, b = deltas[i], deltas[j]
                norms = (_row_dot(a, a) * _row_dot(b, b)).sqrt()
                cos = _row_dot(a, b) / norms.clamp(min=1e-6)
            else:
                value = dot64(deltas[i], deltas[j]) / max(norms[i] * norms[j], 1e-6)
                cos = torch.tensor([[value]], dtype=torch.float64, device=deltas.device)
            total += cos.clamp(-1, 1)
    return total / (k * (k - 1) // 2)


def model_stock(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    filter_wise = bool(p["filter_wise"])
    shape = base.shape
    if filter_wise and base.dim() == 1:
        base, experts = base.unsqueeze(0), experts.unsqueeze(1)
    k = experts.shape[0]
    average = experts.mean(dim=0)
    deltas = experts.sub_(base)
    if filter_wise and base.dim() > 2:  # mergekit takes rows along the last axis
        deltas = deltas.reshape(k, -1, shape[-1])
    cos = mean_pairwise_cosine(deltas, filter_wise)
    t = (k * cos / (1 + (k - 1) * cos)).float()
    if filter_wise:
        t = t.reshape(*base.shape[:-1], 1)
    else:
        t = t.reshape(())
    return (t * average + (1 - t) * base).reshape(shape)


register(
    MethodSpec(
        "model_stock",
        model_stock,
        (Param("filter_wise", False, False, "one angle per row (output filter) instead of per tensor"),),
        needs_base=True,
        summary="average of the fine-tunes moved toward the base by t = k·cosθ / (1 + (k−1)·cosθ)",
        citation="Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024 "
        "(arXiv:2403.19522)",
        check_recipe=rules.at_least("model_stock", 2),
    )
)

__all__ = ["mean_pairwise_cosine", "model_stock"]
