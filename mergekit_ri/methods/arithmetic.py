"""Linear averaging, task arithmetic, TIES and DARE: pure functions over stacked tensors.

Maths from `shared/reference/methods.md` (Ilharco et al. 2023; Yadav et al. 2023; Yu et al.
2024). Weighted forms follow mergekit so that its recipes mean the same here.
"""

from __future__ import annotations

import hashlib

import torch

from .registry import MethodSpec, Param, TensorContext, TensorParams, register
from .select import kth_largest_abs, topk_mask

WEIGHT = Param("weight", 1.0, True, "scale of this model's task vector (or of the model, for linear)")
LAMBDA = Param("lambda", 1.0, False, "scale of the merged task vector")
DENSITY = Param("density", 0.2, True, "fraction of each task vector kept (TIES: largest magnitudes; DARE: random)")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, False, "divide by the sum of the (agreeing) weights")


def weighted_sum(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (stack * weights).sum(dim=0)


def _safe_divisor(total: torch.Tensor) -> torch.Tensor:
    return torch.where(total.abs() < 1e-8, torch.ones_like(total), total)


def linear(base: torch.Tensor | None, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    """Model soup: Σ w_i θ_i (/ Σ w_i when normalize)."""
    w = p.vector("weight", experts)
    merged = weighted_sum(experts, w)
    return merged / _safe_divisor(w.sum()) if p["normalize"] else merged


def task_vectors(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """τ_i = θ_i − θ0, computed in place in the experts' buffer."""
    return experts.sub_(base)


def task_arithmetic(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    """θ0 + λ Σ w_i τ_i (Ilharco et al.)."""
    w = p.vector("weight", experts)
    mixed = weighted_sum(task_vectors(base, experts), w)
    if p["normalize"]:
        mixed = mixed / _safe_divisor(w.sum())
    return base + p["lambda"] * mixed


def trim(deltas: torch.Tensor, densities: list[float], thresholds: tuple[float, ...] | None) -> torch.Tensor:
    """TIES step 1, in place: keep every |τ_i| >= its k-th largest magnitude (ties included)."""
    for i, density in enumerate(densities):
        if thresholds is not None:
            deltas[i].mul_(deltas[i].abs() >= thresholds[i])
        else:
            deltas[i].mul_(topk_mask(deltas[i], density))
    return deltas


def elect_and_merge(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES steps 2-3: sign election by total mass, then the (weighted) disjoint mean.

    Where the mass sums to exactly 0 the elected sign is the tensor's majority sign (+1 if that
    is 0 too), as in the reference code. Experts are visited one at a time so the temporaries
    are a few single tensors, not N-stacked ones. Entry i agrees with the elected sign γ when
    γ·wτ_i > 0 (zero entries never agree).
    """
    elected = torch.sign(weighted.sum(dim=0))
    majority = torch.sign(elected.sum())
    elected[elected == 0] = majority if majority != 0 else 1.0
    mixed = torch.zeros_like(elected)
    count = torch.zeros_like(elected) if normalize else None
    agree = torch.empty(elected.shape, dtype=torch.bool, device=elected.device)
    for i in range(weighted.shape[0]):
        torch.gt(weighted[i] * elected, 0, out=agree)
        mixed.add_(weighted[i].mul_(agree))  # weighted[i] is ours to overwrite
        if count is not None:
            count.add_(agree, alpha=float(weights.reshape(-1)[i]))
    if count is not None:
        mixed.div_(_safe_divisor(count))
    return mixed


def ties(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    """TIES-Merging (Yadav et al.): trim, elect sign, disjoint mean; θ0 + λ τ_m."""
    deltas = trim(task_vectors(base, experts), p.per_model["density"], ctx.thresholds)
    w = p.vector("weight", deltas)
    return base + p["lambda"] * elect_and_merge(deltas.mul_(w), w, p["normalize"])


def rng_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """A generator seed that depends only on (seed, tensor, expert): order- and device-free."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{expert_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_mask(shape: torch.Size, keep: float, seed: int) -> torch.Tensor:
    """Bernoulli(keep) mask drawn on the CPU from a seeded generator, so every device agrees."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(shape, generator=generator) < keep


def dare(deltas: torch.Tensor, densities: list[float], rescale: bool, ctx: TensorContext) -> torch.Tensor:
    """DARE (Yu et al.), in place: drop each entry with probability 1 − density, rescale the rest."""
    for i, keep in enumerate(densities):
        if keep >= 1.0:
            continue
        mask = dare_mask(deltas.shape[1:], keep, rng_seed(ctx.seed, ctx.name, i)).to(deltas.device)
        deltas[i].mul_(mask)
        if rescale and keep > 0:
            deltas[i].div_(keep)
    return deltas


def dare_linear(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    deltas = dare(task_vectors(base, experts), p.per_model["density"], p["rescale"], ctx)
    w = p.vector("weight", deltas)
    mixed = weighted_sum(deltas, w)
    if p["normalize"]:
        mixed = mixed / _safe_divisor(w.sum())
    return base + p["lambda"] * mixed


def dare_ties(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    deltas = dare(task_vectors(base, experts), p.per_model["density"], p["rescale"], ctx)
    w = p.vector("weight", deltas)
    return base + p["lambda"] * elect_and_merge(deltas.mul_(w), w, p["normalize"])


RESCALE = Param("rescale", True, False, "divide kept entries by density (DARE's rescaling)")
TRIM_SCOPE = Param("trim_scope", "tensor", False,
                   "where the top-k magnitude threshold is computed: per tensor (mergekit) or over the "
                   "whole model per expert (the TIES paper; one extra streaming pass)", ("tensor", "model"))

register(MethodSpec(
    "linear", linear, (WEIGHT, _normalize(True)), needs_base=False,
    summary="weighted average of the models (model soup)", elementwise=True,
    citation="Wortsman et al., Model soups, ICML 2022 (arXiv:2203.05482)",
))
register(MethodSpec(
    "task_arithmetic", task_arithmetic, (WEIGHT, LAMBDA, _normalize(False)), needs_base=True,
    summary="base + λ · weighted sum of task vectors", elementwise=True,
    citation="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
))
register(MethodSpec(
    "ties", ties, (WEIGHT, DENSITY, LAMBDA, _normalize(True), TRIM_SCOPE), needs_base=True,
    summary="trim to the top-density magnitudes, elect signs, disjoint mean",
    citation="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708)",
))
register(MethodSpec(
    "dare_linear", dare_linear, (WEIGHT, DENSITY, LAMBDA, _normalize(False), RESCALE), needs_base=True,
    summary="random drop + rescale (DARE), then task arithmetic",
    citation="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)",
))
register(MethodSpec(
    "dare_ties", dare_ties, (WEIGHT, DENSITY, LAMBDA, _normalize(False), RESCALE), needs_base=True,
    summary="random drop + rescale (DARE), then TIES sign election and disjoint mean",
    citation="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099); "
             "Yadav et al., TIES-Merging, NeurIPS 2023",
))

__all__ = ["kth_largest_abs", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
