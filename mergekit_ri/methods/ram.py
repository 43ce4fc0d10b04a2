"""RAM and RAM+ (tensor-local): merge agents fine-tuned by reinforcement learning, whose task
vectors are sparse and mostly disjoint (mergekit's `ram` and `ramplus_tl`).

Reinforced Agent Merging (arXiv:2601.13572): an entry of τᵢ = θᵢ − θ₀ contributes when
|τᵢ| > ε. Where exactly one expert contributes ("unique") its change is taken whole; where several
do ("shared") they are averaged — so a change only one agent made is not diluted by the others'
zeros, as a plain mean would. RAM+ (tensor-local, mergekit's form) also scales each expert's
unique entries by λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ = (its shared entries) / (its unique entries) in
the tensor: an expert that overlaps a lot keeps its few unique changes stronger.
"""

from __future__ import annotations

import torch

from . import rules
from .registry import MethodSpec, Param, TensorContext, TensorParams, register

EPSILON = Param(
    "epsilon",
    1e-5,
    False,
    "an entry of τᵢ contributes when |τᵢ| > epsilon (the exact fp32 τ; mergekit 0.1.5 compares τ "
    "rounded to the recipe's dtype)",
)


def contributions(base: torch.Tensor, experts: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, ...]:
    """τᵢ zeroed where |τᵢ| ≤ ε (in place of `experts`), the [N, ...] mask of contributing
    entries and the per-entry count of contributing experts (fp32, exact below 2²⁴ experts)."""
    taus = experts.sub_(base)
    keep = taus.abs() > epsilon
    taus.mul_(keep)
    return taus, keep, keep.sum(0, dtype=torch.float32)


def ram(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    """θ₀ + Σᵢ τᵢ[|τᵢ| > ε] / max(1, #contributing): unique entries whole, shared ones averaged."""
    taus, _, counts = contributions(base, experts, float(p["epsilon"]))
    return base + taus.sum(0) / counts.clamp_(min=1)


def ramplus_lambdas(keep: torch.Tensor, unique: torch.Tensor, r: float, alpha: float, epsilon: float):
    """λᵢ = 1 + r·clamp(shared_i / max(unique_i, ε), 0, α) from the tensor's entry counts (fp32,
    as mergekit; a negative α clamps every ρ to α, torch's rule, as there)."""
    flat = keep.reshape(keep.shape[0], -1)
    unique_counts = (flat & unique.reshape(1, -1)).sum(1)
    shared_counts = flat.sum(1) - unique_counts  # contributing and not unique: shared
    rho = shared_counts.float() / unique_counts.float().clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


def ramplus_tl(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    """As `ram`, with each expert's unique entries times its λᵢ (see `ramplus_lambdas`)."""
    epsilon = float(p["epsilon"])
    taus, keep, counts = contributions(base, experts, epsilon)
    unique = counts == 1
    lam = ramplus_lambdas(keep, unique, float(p["r"]), float(p["alpha"]), epsilon).to(taus.device)
    shared = taus.sum(0).div_(counts.clamp_(min=1))
    scaled = torch.einsum("n...,n->...", taus, lam)  # Σᵢ λᵢτᵢ: one term at a unique entry
    return base + torch.where(unique, scaled, shared)


def _workspace(shape: tuple[int, ...], n: int) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * (n + 3 * 4)  # the [N, ...] mask, the counts, the sum and the result


CITATION = "Reinforced Agent Merging (arXiv:2601.13572); mergekit's ram / ramplus_tl"
register(
    MethodSpec(
        "ram",
        ram,
        (EPSILON,),
        needs_base=True,
        elementwise=True,
        workspace=_workspace,
        summary="τᵢ entries with |τᵢ| > ε: taken whole where one expert changed the entry, averaged where several did",
        citation=CITATION,
        check_recipe=rules.at_least("ram", 1),
    )
)
register(
    MethodSpec(
        "ramplus_tl",
        ramplus_tl,
        (
            Param("r", 0.1, False, "strength of the boost of an expert's unique entries"),
            Param("alpha", 0.2, False, "cap of the shared/unique ratio ρ in λ = 1 + r·clamp(ρ, 0, alpha)"),
            EPSILON,
        ),
        needs_base=True,
        workspace=_workspace,
        summary="ram, with each expert's unique entries scaled by 1 + r·clamp(shared/unique, 0, alpha) "
        "(counts per tensor)",
        citation=CITATION,
        check_recipe=rules.at_least("ramplus_tl", 1),
    )
)

__all__ = ["contributions", "ram", "ramplus_lambdas", "ramplus_tl"]
