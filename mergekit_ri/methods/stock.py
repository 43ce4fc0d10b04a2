"""Model Stock: average the fine-tunes, then pull the average toward the base by how much the
fine-tunes agree.

Jang et al. (arXiv:2403.19522) show that fine-tuned weights lie on a thin shell around a centre;
with the angle θ between task vectors, the point of the segment base→average nearest that centre
is t = k·cos θ / (1 + (k − 1)·cos θ) of the way (k fine-tunes). As in mergekit, cos θ is the mean
over pairs of task vectors, per tensor, or per row with `filter_wise` (a 1-D tensor is one row).
"""

from __future__ import annotations

import math

import torch

from .. import kernels
from . import rules
from .geometry import CHUNK, gram64
from .registry import MethodSpec, Param, TensorContext, TensorParams, register


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products, accumulated in float64 (the fp32 products are one tensor's size)."""
    return (a * b).sum(dim=-1, keepdim=True, dtype=torch.float64)


def mean_cosine(gram: torch.Tensor) -> float:
    """cos θ averaged over pairs of task vectors from their float64 Gram matrix ⟨τᵢ, τⱼ⟩; norm
    products clamped at 1e-6 and cosines to [−1, 1], as mergekit does."""
    k = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt().tolist()
    total = sum(
        min(1.0, max(-1.0, float(gram[i, j]) / max(norms[i] * norms[j], 1e-6)))
        for i in range(k)
        for j in range(i + 1, k)
    )
    return total / (k * (k - 1) // 2)


def mean_pairwise_cosine(deltas: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """cos θ averaged over pairs of [k, ...] task vectors: a [1, 1] tensor, or [rows, 1] per row."""
    k = deltas.shape[0]
    if not filter_wise:
        return torch.tensor([[mean_cosine(gram64(list(deltas)))]], dtype=torch.float64, device=deltas.device)
    total = torch.zeros(deltas.shape[1], 1, dtype=torch.float64, device=deltas.device)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = deltas[i], deltas[j]
            norms = (_row_dot(a, a) * _row_dot(b, b)).sqrt()
            total += (_row_dot(a, b) / norms.clamp(min=1e-6)).clamp(-1, 1)
    return total / (k * (k - 1) // 2)


def stock_ratio(cos: float, k: int) -> float:
    """t = k·cos θ / (1 + (k − 1)·cos θ), the paper's position on the segment base → average."""
    return k * cos / (1 + (k - 1) * cos)


def model_stock(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    """Takes the inputs as read (bf16...). Per tensor: one pass for every ⟨τᵢ, τⱼ⟩ (`gram64`), then
    θ₀ + t·Σ τᵢ / k in one fused pass rounded once (the task-arithmetic kernel): no fp32 copies."""
    k = experts.shape[0]
    if not p["filter_wise"]:
        t = stock_ratio(mean_cosine(gram64(list(experts), center=base)), k)
        flat = experts.reshape(k, -1)
        return kernels.task_arithmetic(base.reshape(-1), flat, [1.0] * k, t, True, ctx.out_dtype).reshape(
            base.shape
        )
    return _model_stock_rows(base.float(), experts.to(torch.float32, copy=True))


def _model_stock_rows(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """`filter_wise`: one t per row (the last axis; a 1-D tensor is one row), on fp32 copies
    (`experts` is overwritten)."""
    shape = base.shape
    if base.dim() == 1:
        base, experts = base.unsqueeze(0), experts.unsqueeze(1)
    k = experts.shape[0]
    average = experts.mean(dim=0)
    deltas = experts.sub_(base)
    if base.dim() > 2:  # mergekit takes rows along the last axis
        deltas = deltas.reshape(k, -1, shape[-1])
    cos = mean_pairwise_cosine(deltas, filter_wise=True)
    t = (k * cos / (1 + (k - 1) * cos)).float().reshape(*base.shape[:-1], 1)
    return (t * average + (1 - t) * base).reshape(shape)


def stock_workspace(shape: tuple[int, ...], n: int) -> int:
    """`filter_wise` holds fp32 copies (base, experts, average, products); otherwise only
    `gram64`'s chunk buffers."""
    return math.prod(shape) * 4 * (2 * n + 4) + (n + 1) * CHUNK * 4


register(
    MethodSpec(
        "model_stock",
        model_stock,
        (Param("filter_wise", False, False, "one angle per row (output filter) instead of per tensor"),),
        needs_base=True,
        raw_inputs=True,
        workspace=stock_workspace,
        summary="average of the fine-tunes moved toward the base by t = k·cosθ / (1 + (k−1)·cosθ)",
        citation="Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024 "
        "(arXiv:2403.19522)",
        check_recipe=rules.at_least("model_stock", 2),
    )
)

__all__ = ["mean_cosine", "mean_pairwise_cosine", "model_stock", "stock_ratio"]
