"""Linear averaging, task arithmetic, TIES and DARE: pure functions over stacked tensors.

Maths from `shared/reference/methods.md` (Ilharco et al. 2023; Yadav et al. 2023; Yu et al.
2024). Weighted forms follow mergekit so that its recipes mean the same here.
"""

from __future__ import annotations

from .. import kernels
from ..kernels.rng import rng_key
from ..lazy import torch
from .model_trim import MODEL_TRIM
from .registry import MethodSpec, Param, TensorContext, TensorParams, register

WEIGHT = Param("weight", 1.0, True, "scale of this model's task vector (or of the model, for linear)")
LAMBDA = Param("lambda", 1.0, False, "scale of the merged task vector")
# density defaults to mergekit's 1 (no trimming, no drop), so that a mergekit recipe without it merges alike
TIES_DENSITY = Param(
    "density",
    1.0,
    True,
    "fraction of each task vector kept, by magnitude "
    "(1: no trimming, mergekit's default; the paper uses 0.2)",
)
DARE_DENSITY = Param(
    "density",
    1.0,
    True,
    "fraction of each task vector kept at random "
    "(1: no drop, mergekit's default; the paper drops 90%, density 0.1)",
)


def _normalize(default: bool) -> Param:
    return Param("normalize", default, False, "divide by the sum of the (agreeing) weights")


def _flat(base: torch.Tensor | None, experts: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    return (base.reshape(-1) if base is not None else None), experts.reshape(experts.shape[0], -1)


def task_vectors(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """τ_i = θ_i − θ0 in place in an fp32 experts buffer (for the methods that take fp32 stacks)."""
    return experts.sub_(base)


def linear(
    base: torch.Tensor | None, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    """Model soup: Σ w_i θ_i (/ Σ w_i when normalize)."""
    _, flat = _flat(None, experts)
    return kernels.weighted_sum(flat, p.per_model["weight"], p["normalize"], ctx.out_dtype).reshape(
        experts.shape[1:]
    )


def task_arithmetic(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    """θ0 + λ Σ w_i τ_i (Ilharco et al.)."""
    b, e = _flat(base, experts)
    return kernels.task_arithmetic(
        b, e, p.per_model["weight"], p["lambda"], p["normalize"], ctx.out_dtype
    ).reshape(base.shape)


def _source(base: torch.Tensor | None, experts: torch.Tensor | None, ctx: TensorContext) -> kernels.Source:
    """The inputs: tensors in memory, or (for huge tensors) the engine's row reader in ctx.source."""
    return ctx.source if ctx.source is not None else kernels.TensorSource(base, experts)


def ties(
    base: torch.Tensor | None, experts: torch.Tensor | None, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    """TIES-Merging (Yadav et al.): trim to the top-k magnitudes (ties at the threshold kept),
    elect signs by total mass, disjoint mean; θ0 + λ τ_m."""
    src = _source(base, experts, ctx)
    if ctx.block_stats is not None:  # a block of rows: the whole tensor's thresholds and balance
        thresholds, balance = ctx.block_stats
    else:
        thresholds, balance = _ties_thresholds(src, p, ctx), None
    return kernels.ties(
        src, list(thresholds), p.per_model["weight"], p["lambda"], p["normalize"], ctx.out_dtype, balance
    ).reshape(src.shape)


def _ties_thresholds(src: kernels.Source, p: TensorParams, ctx: TensorContext) -> tuple[float, ...]:
    if p["trim_scope"] == "model" and ctx.prepass is not None:  # found by MODEL_TRIM over the whole model
        return tuple(ctx.prepass)
    return tuple(kernels.magnitude_thresholds_source(src, p.per_model["density"]))


def ties_block_stats(
    src: kernels.Source, p: TensorParams, ctx: TensorContext
) -> tuple[tuple[float, ...], int]:
    """A whole tensor's thresholds and election balance, for merging it block by block."""
    thresholds = _ties_thresholds(src, p, ctx)
    balance = kernels.ties_balance(
        src, list(thresholds), p.per_model["weight"], p["lambda"], p["normalize"], ctx.out_dtype
    )
    return thresholds, balance


def _dare(
    base: torch.Tensor | None, experts: torch.Tensor | None, p: TensorParams, ctx: TensorContext, elect: bool
) -> torch.Tensor:
    """DARE (Yu et al.): drop each τ entry with probability 1 − density (a counter-based draw keyed
    by seed, tensor, expert and entry index), rescale by 1/density, then sum or TIES-elect."""
    src = _source(base, experts, ctx)
    return kernels.dare(
        src,
        ctx.offset,
        *_dare_terms(src, p, ctx),
        elect,
        ctx.out_dtype,
        ctx.block_stats,  # a block of rows: the whole tensor's election balance
    ).reshape(src.shape)


def _dare_terms(src: kernels.Source, p: TensorParams, ctx: TensorContext) -> tuple:
    """densities, keys, weights, λ, normalize, rescale: DARE's arguments after the offset."""
    keys = [rng_key(ctx.seed, ctx.name, i) for i in range(src.count)]
    return p.per_model["density"], keys, p.per_model["weight"], p["lambda"], p["normalize"], p["rescale"]


def dare_ties_block_stats(src: kernels.Source, p: TensorParams, ctx: TensorContext) -> int:
    """A whole tensor's DARE-TIES election balance, for merging it block by block."""
    return kernels.dare_balance(src, 0, *_dare_terms(src, p, ctx), ctx.out_dtype)


def dare_linear(
    base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    return _dare(base, experts, p, ctx, elect=False)


def dare_ties(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    return _dare(base, experts, p, ctx, elect=True)


RESCALE = Param("rescale", True, False, "divide kept entries by density (DARE's rescaling)")
TRIM_SCOPE = Param(
    "trim_scope",
    "tensor",
    False,
    "where the top-k magnitude threshold is computed: per tensor (mergekit) or over the "
    "whole model per expert (the TIES paper; one extra streaming pass)",
    ("tensor", "model"),
)

register(
    MethodSpec(
        "linear",
        linear,
        (WEIGHT, _normalize(True)),
        needs_base=False,
        base_as_model=True,
        summary="weighted average of the models (model soup)",
        elementwise=True,
        raw_inputs=True,
        citation="Wortsman et al., Model soups, ICML 2022 (arXiv:2203.05482)",
    )
)
register(
    MethodSpec(
        "task_arithmetic",
        task_arithmetic,
        (WEIGHT, LAMBDA, _normalize(False)),
        needs_base=True,
        summary="base + λ · weighted sum of task vectors",
        elementwise=True,
        raw_inputs=True,
        citation="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    )
)
register(
    MethodSpec(
        "ties",
        ties,
        (WEIGHT, TIES_DENSITY, LAMBDA, _normalize(True), TRIM_SCOPE),
        needs_base=True,
        summary="trim to the top-density magnitudes, elect signs, disjoint mean",
        raw_inputs=True,
        streams=True,
        block_stats=ties_block_stats,
        prepass=MODEL_TRIM,
        citation="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708)",
    )
)
register(
    MethodSpec(
        "dare_linear",
        dare_linear,
        (WEIGHT, DARE_DENSITY, LAMBDA, _normalize(False), RESCALE),
        needs_base=True,
        summary="random drop + rescale (DARE), then task arithmetic",
        elementwise=True,
        raw_inputs=True,
        citation="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)",
    )
)
register(
    MethodSpec(
        "dare_ties",
        dare_ties,
        (WEIGHT, DARE_DENSITY, LAMBDA, _normalize(False), RESCALE),
        needs_base=True,
        summary="random drop + rescale (DARE), then TIES sign election and disjoint mean",
        raw_inputs=True,
        streams=True,
        block_stats=dare_ties_block_stats,
        citation="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099); "
        "Yadav et al., TIES-Merging, NeurIPS 2023",
    )
)

__all__ = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
