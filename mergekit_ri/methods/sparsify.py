"""Breadcrumbs, DELLA and SCE: sparsify each task vector, then sum or sign-elect, as mergekit.

All three follow mergekit's generalized task arithmetic: each τᵢ is sparsified on its own
(Breadcrumbs: drop the smallest and the γ largest magnitudes; DELLA: drop at random with a keep
probability that grows with the magnitude's rank in its row), weighted, optionally sign-elected
(mergekit's rule: the sign of Σ wᵢτ̂ᵢ, + where it is 0) and summed, divided by the (agreeing)
weights when `normalize`, scaled by λ and added to the base. SCE selects the entries where the
experts vary most, weights the experts by their mean squared τ and sign-elects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from ..kernels.rng import UNIFORM_BITS, hash_counter, rng_key
from ..lazy import torch
from . import rules
from .arithmetic import task_vectors
from .registry import MethodSpec, Param, TensorContext, TensorParams, register

if TYPE_CHECKING:
    from ..recipe import Recipe


def l1_rescaled(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`kept` scaled to τ's L1 norm (mergekit's `rescale`), unless either norm is below 1e-7."""
    before, after = float(tau.abs().sum(dtype=torch.float64)), float(kept.abs().sum(dtype=torch.float64))
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ entries just below the ⌊γ·n⌋ largest magnitudes (fewer outliers are
    dropped when the two overlap). Ties are broken by position (a stable sort)."""
    n = tau.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = torch.sort(tau.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[bottom : n - top]] = True
    return mask.reshape(tau.shape)


def della_keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE: per row (axis 1; a 1-D tensor is one row) the magnitudes' ranks r = 0..m−1 give
    keep probabilities density − ε + 2ε·r/(m − 1) (density for one-entry rows)."""
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(rows.shape[1], device=tau.device).expand_as(order).contiguous())
    span = max(rows.shape[1] - 1, 1)
    fraction = ranks.to(torch.float32) / span if rows.shape[1] > 1 else torch.full_like(rows, 0.5)
    return ((density - epsilon) + fraction * (2 * epsilon)).reshape(tau.shape)


def della_drop(
    tau: torch.Tensor, density: float, epsilon: float, rescale: bool, key: tuple[int, int], where: str
) -> torch.Tensor:
    """DELLA's random drop: entry j is kept when the counter-based draw u(key, j) < its keep
    probability p_j, and divided by p_j when `rescale` (the paper's 1/p, as our DARE)."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise UserError(
            f"{where}: density ± epsilon must lie in (0, 1); got density {density:g}, epsilon {epsilon:g}"
        )
    probability = della_keep_probability(tau, density, epsilon)
    index = torch.arange(tau.numel(), dtype=torch.int64, device=tau.device).reshape(tau.shape)
    draws = hash_counter(index, key) >> (32 - UNIFORM_BITS)
    kept = draws < torch.round(probability.double() * (1 << UNIFORM_BITS)).to(torch.int64)
    return torch.where(kept, tau / probability if rescale else tau, torch.zeros_like(tau))


def combine(
    base: torch.Tensor, taus: torch.Tensor, weights: list[float], elect: bool, normalize: bool, lam: float
) -> torch.Tensor:
    """θ₀ + λ·Σ wᵢτ̂ᵢ (over the agreeing signs when `elect`), / Σ of those wᵢ when `normalize`."""
    w = torch.tensor(weights, dtype=taus.dtype, device=taus.device).reshape(-1, *([1] * (taus.dim() - 1)))
    weighted = taus * w
    if elect:
        majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        agree = torch.sign(weighted) == majority
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def _breadcrumbs(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, elect: bool) -> torch.Tensor:
    taus = task_vectors(base, experts)
    for i, tau in enumerate(taus):
        density, gamma = p.per_model["density"][i], p.per_model["gamma"][i]
        if density < 1:
            kept = tau * breadcrumbs_mask(tau, density, gamma)
            taus[i] = l1_rescaled(tau, kept) if p["rescale"] else kept
    return combine(base, taus, p.per_model["weight"], elect, bool(p["normalize"]), float(p["lambda"]))


def breadcrumbs(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    return _breadcrumbs(base, experts, p, elect=False)


def breadcrumbs_ties(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    return _breadcrumbs(base, experts, p, elect=True)


def _della(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext, elect: bool
) -> torch.Tensor:
    taus = task_vectors(base, experts)
    for i, tau in enumerate(taus):
        taus[i] = della_drop(
            tau,
            p.per_model["density"][i],
            p.per_model["epsilon"][i],
            bool(p["rescale"]),
            rng_key(ctx.seed, ctx.name, i),
            f"tensor '{ctx.name}', models[{i}]",
        )
    return combine(base, taus, p.per_model["weight"], elect, bool(p["normalize"]), float(p["lambda"]))


def della(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    return _della(base, experts, p, ctx, elect=True)


def della_linear(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    return _della(base, experts, p, ctx, elect=False)


def sce_mask(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ⌊fraction·m⌋ entries with the largest variance across experts, m the entries whose
    variance is not 0 (ties broken by position)."""
    if fraction >= 1:
        return torch.ones(taus.shape[1:], dtype=torch.bool, device=taus.device)
    variance = taus.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * fraction)
    mask = torch.zeros(variance.numel(), dtype=torch.bool, device=taus.device)
    if k > 0:
        mask[torch.sort(variance.reshape(-1), descending=True, stable=True).indices[:k]] = True
    return mask.reshape(variance.shape)


def sce(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    """Select (top-variance entries), Calculate (weights ∝ mean τᵢ²), Erase (minority signs)."""
    taus = task_vectors(base, experts)
    if p["select_topk"] < 1:
        taus *= sce_mask(taus, float(p["select_topk"]))
    energy = taus.pow(2).reshape(taus.shape[0], -1).mean(dim=1, dtype=torch.float64)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1 / energy.numel()) if abs(total) < 1e-6 else energy / total
    w = weights.to(taus.dtype).reshape(-1, *([1] * (taus.dim() - 1)))
    majority = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0)
    erased = w * (torch.sign(taus) == majority)
    return base + (taus * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


def check_della(method: str) -> rules.RecipeCheck:
    """density ± epsilon in (0, 1) wherever 0 < density < 1, for every value the recipe gives."""

    def check(recipe: Recipe, source: str) -> None:
        for i in range(len(recipe.models)):
            for density in rules.model_values(recipe, i, "density", 1.0):
                for epsilon in rules.model_values(recipe, i, "epsilon", 0.15):
                    if 0 < density < 1 and (density - epsilon <= 0 or density + epsilon >= 1):
                        raise UserError(
                            f"{source}: models[{i}]: merge_method '{method}' needs density ± epsilon "
                            f"in (0, 1) where 0 < density < 1; got density {density:g}, epsilon {epsilon:g}"
                        )

    return check


def _gta_params(
    density_doc: str, extra: Param, normalize: bool, rescale: bool, rescale_doc: str
) -> tuple[Param, ...]:
    return (
        Param("weight", 1.0, True, "scale of this model's task vector"),
        Param("density", 1.0, True, density_doc),
        extra,
        Param("lambda", 1.0, False, "scale of the merged task vector"),
        Param("normalize", normalize, False, "divide by the sum of the (agreeing) weights"),
        Param("rescale", rescale, False, rescale_doc),
    )


GAMMA = Param("gamma", 0.01, True, "fraction of the largest magnitudes dropped as outliers")
EPSILON = Param("epsilon", 0.15, True, "keep probabilities span density ± epsilon by magnitude rank")
CRUMBS_DENSITY = "fraction of each task vector kept (1: no sparsification; the paper uses ~0.1)"
DELLA_DENSITY = "mean keep probability (1: no drop; the paper tunes 0.3–0.7)"
L1 = "rescale the kept entries to the task vector's L1 norm (mergekit's rule)"
INVERSE = "divide each kept entry by its keep probability (the paper; mergekit preserves the L1 norm)"
BREADCRUMBS = (
    "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
    "ECCV 2024 (arXiv:2312.06795)"
)
DELLA = (
    "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
    "Sampling (arXiv:2406.11617)"
)

register(
    MethodSpec(
        "breadcrumbs",
        breadcrumbs,
        _gta_params(CRUMBS_DENSITY, GAMMA, False, False, L1),
        needs_base=True,
        summary="drop the smallest and the γ largest magnitudes of each τ, then task arithmetic",
        citation=BREADCRUMBS,
    )
)
register(
    MethodSpec(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        _gta_params(CRUMBS_DENSITY, GAMMA, False, False, L1),
        needs_base=True,
        summary="Breadcrumbs' sparsification, then TIES-style sign election",
        citation=BREADCRUMBS,
    )
)
register(
    MethodSpec(
        "della",
        della,
        _gta_params(DELLA_DENSITY, EPSILON, True, True, INVERSE),
        needs_base=True,
        summary="random drop with magnitude-ranked keep probabilities (MAGPRUNE), sign election, mean",
        citation=DELLA,
        check_recipe=check_della("della"),
    )
)
register(
    MethodSpec(
        "della_linear",
        della_linear,
        _gta_params(DELLA_DENSITY, EPSILON, False, True, INVERSE),
        needs_base=True,
        summary="DELLA's magnitude-ranked random drop, then task arithmetic",
        citation=DELLA,
        check_recipe=check_della("della_linear"),
    )
)
register(
    MethodSpec(
        "sce",
        sce,
        (Param("select_topk", 1.0, False, "fraction of entries kept, by variance across models"),),
        needs_base=True,
        summary="select high-variance entries, weight experts by mean τ², erase minority signs",
        citation="Wan et al., FuseChat: Knowledge Fusion of Chat Models (SCE), arXiv:2408.07990",
    )
)

__all__ = [
    "breadcrumbs",
    "breadcrumbs_mask",
    "breadcrumbs_ties",
    "della",
    "della_drop",
    "della_keep_probability",
    "della_linear",
    "sce",
    "sce_mask",
]
