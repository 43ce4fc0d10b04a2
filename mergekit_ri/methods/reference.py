"""The plain torch version of every element-wise method, and of RAM (`ram`, `ramplus_tl`): the
papers' formulas, a few lines each.

Whole tensors, fp32, no blocks, threads or in-place tricks (in the style of peft's `merge_utils`).
This is the one readable statement of the maths; the fast backends (`kernels.blocked`, the C
kernels of `kernels.native`, the Triton kernels of `kernels.fused`) are optimised rewrites of it,
and `tests/test_reference.py` holds every one of them to these functions, and these functions to
hand-computed examples of the formulas. Nothing in a merge calls this module.

Inputs: a base θ0 [...] and experts θ_i stacked as [N, ...], in any float dtype (upcast to fp32
here); per-expert lists (weights w_i, densities) of length N. Outputs are fp32.

Rules the papers leave open, as the project decides them (docs/methods.md, "Where we differ"):
- TIES keeps every entry tied with the k-th largest magnitude (the paper's reference code), not
  exactly k of them;
- where the elected sum Σ_i w_i τ̂_i of an entry is exactly 0, γ is the tensor's majority sign
  (the sign of Σ_j γ_j over the tensor; +1 if that is 0 too);
- agreement and counts use the weighted task vectors w_i τ̂_i (a negative weight flips a sign);
- a divisor below 1e-8 in magnitude (Σ w_i, or the agreeing weights) is replaced by 1;
- DARE draws its mask from the counter-based generator of `kernels.rng`, so an entry's fate
  depends only on (seed, tensor, expert, entry index).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels.rng import keep_mask

Weights = Sequence[float]


def per_expert(values: Weights, like: torch.Tensor) -> torch.Tensor:
    """A per-expert list as an fp32 [N, 1, 1, ...] column that broadcasts against [N, ...]."""
    return torch.tensor(list(values), dtype=torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


def safe_divisor(x: torch.Tensor) -> torch.Tensor:
    """x, with 1 where |x| < 1e-8: dividing by (almost) nothing leaves the numerator as it is."""
    return torch.where(x.abs() < 1e-8, torch.ones_like(x), x)


def task_vectors(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """τ_i = θ_i − θ0, in fp32."""
    return experts.float() - base.float()


def rows_total(x: torch.Tensor) -> torch.Tensor:
    """Σ_i x_i over the first axis, added in order (row 0 first), as every backend adds them."""
    return sum(x[1:], x[0].clone())


def add_scaled(base: torch.Tensor, merged: torch.Tensor, lam: float) -> torch.Tensor:
    """θ0 + λ·τ_m with one rounding (a fused multiply-add, as every backend on the CPU does)."""
    return torch.add(base.float(), merged, alpha=lam)


# ---- linear and task arithmetic ------------------------------------------------------------------


def linear(experts: torch.Tensor, weights: Weights, normalize: bool = True) -> torch.Tensor:
    """Model soup (Wortsman et al., ICML 2022, arXiv:2203.05482): θ = Σ_i w_i θ_i / Σ_i w_i
    (the division only when `normalize`). No base model."""
    w = per_expert(weights, experts)
    merged = rows_total(w * experts.float())
    return merged / safe_divisor(w.sum()) if normalize else merged


def task_arithmetic(
    base: torch.Tensor, experts: torch.Tensor, weights: Weights, lam: float = 1.0, normalize: bool = False
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023, arXiv:2212.04089): θ = θ0 + λ Σ_i w_i τ_i, the
    sum divided by Σ_i w_i when `normalize` (mergekit's weighted form)."""
    w = per_expert(weights, experts)
    merged = rows_total(w * task_vectors(base, experts))
    if normalize:
        merged = merged / safe_divisor(w.sum())
    return add_scaled(base, merged, lam)


# ---- TIES -----------------------------------------------------------------------------------------


def magnitude_threshold(tau: torch.Tensor, density: float) -> float:
    """TIES's trim threshold t: the k-th largest |τ| of one task vector, k = ⌊density·n⌋
    (inf when k = 0: nothing kept; 0 when k = n: everything kept)."""
    k = int(density * tau.numel())
    if k <= 0:
        return float("inf")
    if k >= tau.numel():
        return 0.0
    return float(tau.abs().flatten().sort(descending=True).values[k - 1])


def model_thresholds(
    bases: Sequence[torch.Tensor], experts: Sequence[torch.Tensor], densities: Weights
) -> list[float]:
    """`trim_scope: model` (the TIES paper's own rule): each expert's threshold over all the
    model's merged tensors at once, i.e. over the concatenation of its task vectors
    (`bases[j]` and `experts[j]` [N, ...] are the j-th tensor of the model)."""
    tau = torch.cat([task_vectors(b, e).reshape(e.shape[0], -1) for b, e in zip(bases, experts)], dim=1)
    return [magnitude_threshold(row, d) for row, d in zip(tau, densities)]


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """TIES step 1, trim: τ̂ = τ where |τ| >= t, else 0 (ties with the k-th magnitude all kept)."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_signs(weighted: torch.Tensor) -> torch.Tensor:
    """TIES step 2, elect: γ = sign(Σ_i w_i τ̂_i), the sign of the larger total mass. Where that
    sum is exactly 0, the tensor's majority sign sign(Σ_j γ_j) (+1 if that is 0 too)."""
    gamma = torch.sign(rows_total(weighted))
    majority = -1.0 if float(gamma.sum()) < 0 else 1.0
    return torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)


def disjoint_mean(
    weighted: torch.Tensor, gamma: torch.Tensor, weights: Weights, normalize: bool
) -> torch.Tensor:
    """TIES step 3, disjoint merge: τ_m = Σ_i [sign(w_i τ̂_i) = γ] w_i τ̂_i, divided (when
    `normalize`) by the agreeing weights Σ_i [sign(w_i τ̂_i) = γ] w_i. Zero entries never agree."""
    agree = (torch.sign(weighted) == gamma).float()
    merged = rows_total(weighted * agree)
    if not normalize:
        return merged
    return merged / safe_divisor(rows_total(per_expert(weights, weighted) * agree))


def ties(
    base: torch.Tensor,
    experts: torch.Tensor,
    weights: Weights,
    densities: Weights,
    lam: float = 1.0,
    normalize: bool = True,
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """TIES-Merging (Yadav et al., NeurIPS 2023, arXiv:2306.01708): trim each τ_i to its
    top-density magnitudes, elect signs, disjoint mean; θ = θ0 + λ τ_m. `thresholds` (one per
    expert) replace the per-tensor ones, as `trim_scope: model` does (see `model_thresholds`)."""
    tau = task_vectors(base, experts)
    if thresholds is None:
        thresholds = [magnitude_threshold(t, d) for t, d in zip(tau, densities)]
    trimmed = torch.stack([trim(t, th) for t, th in zip(tau, thresholds)])
    weighted = per_expert(weights, tau) * trimmed
    return add_scaled(base, disjoint_mean(weighted, elect_signs(weighted), weights, normalize), lam)


# ---- DARE -----------------------------------------------------------------------------------------


def dare_drop(
    tau: torch.Tensor, density: float, key: tuple[int, int], rescale: bool = True, offset: int = 0
) -> torch.Tensor:
    """DARE's drop and rescale (Yu et al., ICML 2024, arXiv:2311.03099): τ̃ = m ⊙ τ / p with
    m_j ~ Bernoulli(p), p = density. m_j is the counter-based draw for flat entry `offset + j`
    under `key` (`kernels.rng.rng_key(seed, tensor, expert)`); the rescale multiplies by the fp32
    1/p (nothing is rescaled when p = 0: every entry is dropped)."""
    dropped = tau * keep_mask(offset, tau.numel(), density, key).reshape(tau.shape)
    return dropped * (1.0 / density) if rescale and density > 0 else dropped


def dare(
    base: torch.Tensor,
    experts: torch.Tensor,
    weights: Weights,
    densities: Weights,
    keys: Sequence[tuple[int, int]],
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    elect: bool = False,
    offset: int = 0,
) -> torch.Tensor:
    """DARE then task arithmetic (`dare_linear`: θ0 + λ Σ_i w_i τ̃_i, / Σ_i w_i when `normalize`)
    or then TIES's election and disjoint mean without trimming (`dare_ties`, `elect`)."""
    tau = task_vectors(base, experts)
    dropped = torch.stack([dare_drop(t, d, k, rescale, offset) for t, d, k in zip(tau, densities, keys)])
    weighted = per_expert(weights, tau) * dropped
    if elect:
        merged = disjoint_mean(weighted, elect_signs(weighted), weights, normalize)
    else:
        merged = rows_total(weighted)
        if normalize:
            merged = merged / safe_divisor(per_expert(weights, tau).sum())
    return add_scaled(base, merged, lam)


def dare_linear(
    base: torch.Tensor,
    experts: torch.Tensor,
    weights: Weights,
    densities: Weights,
    keys: Sequence[tuple[int, int]],
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
) -> torch.Tensor:
    """DARE + task arithmetic (see `dare`)."""
    return dare(base, experts, weights, densities, keys, lam, normalize, rescale, elect=False)


def dare_ties(
    base: torch.Tensor,
    experts: torch.Tensor,
    weights: Weights,
    densities: Weights,
    keys: Sequence[tuple[int, int]],
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
) -> torch.Tensor:
    """DARE + TIES election and disjoint mean (see `dare`)."""
    return dare(base, experts, weights, densities, keys, lam, normalize, rescale, elect=True)


# ---- RAM -------------------------------------------------------------------------------------------


def ram_masks(tau: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RAM's masks (arXiv:2601.13572, as mergekit 0.1.5): which τ_i entries contribute (|τ_i| > ε),
    where exactly one expert contributes (unique) and where several do (overlap)."""
    nonzero = tau.abs() > epsilon
    count = nonzero.sum(dim=0, keepdim=True)
    return nonzero, count == 1, count > 1


def ram(base: torch.Tensor, experts: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """Reinforced Agent Merging: θ = θ0 + Σ_i (τ_i [unique] + τ_i [overlap] / c), τ_i zeroed
    where |τ_i| ≤ ε and c the number of contributing experts: a change one expert made is kept
    whole, changes several made are averaged."""
    tau = task_vectors(base, experts)
    nonzero, unique, overlap = ram_masks(tau, epsilon)
    count = nonzero.sum(dim=0, keepdim=True).clamp(min=1).float()
    tau = tau * nonzero
    return base.float() + (tau * unique + tau * overlap / count).sum(dim=0)


def ramplus_tl(
    base: torch.Tensor, experts: torch.Tensor, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """RAM+ (tensor-local): as `ram`, with expert i's unique entries times
    λ_i = 1 + r·clamp(ρ_i, 0, α), ρ_i = #(i contributes, overlap) / max(#(i contributes, unique), ε)."""
    tau = task_vectors(base, experts)
    nonzero, unique, overlap = ram_masks(tau, epsilon)
    count = nonzero.sum(dim=0, keepdim=True).clamp(min=1).float()
    flat = nonzero.reshape(len(tau), -1)
    shared_i = (flat & overlap.reshape(1, -1)).sum(dim=1).float()
    unique_i = (flat & unique.reshape(1, -1)).sum(dim=1).float()
    lam = 1 + r * (shared_i / unique_i.clamp(min=epsilon)).clamp(min=0, max=alpha)
    tau = tau * nonzero
    return base.float() + (tau * unique * per_expert(lam.tolist(), tau) + tau * overlap / count).sum(dim=0)


__all__ = [
    "add_scaled",
    "dare",
    "dare_drop",
    "dare_linear",
    "dare_ties",
    "disjoint_mean",
    "elect_signs",
    "linear",
    "magnitude_threshold",
    "model_thresholds",
    "per_expert",
    "ram",
    "ram_masks",
    "ramplus_tl",
    "rows_total",
    "safe_divisor",
    "task_arithmetic",
    "task_vectors",
    "ties",
    "trim",
]
