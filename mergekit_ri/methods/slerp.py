"""SLERP and NuSLERP: spherical interpolation between two models, as mergekit defines them.

`slerp` walks the great circle from the base (t = 0) to the other model (t = 1), the angle taken
over the whole tensor; nearly parallel tensors (|cos| > 0.9995) are interpolated linearly, as in
mergekit (the spherical formula divides by sin θ ≈ 0 there). `nuslerp` does the same between two
models (or their task vectors, with a base), per row or over the flattened tensor, with
t = w₂ / (w₁ + w₂) from the models' weights.
"""

from __future__ import annotations

import math

import torch

from .. import kernels
from . import rules
from .geometry import CHUNK, dot64, gram64, norm64
from .registry import MethodSpec, Param, TensorContext, TensorParams, register

DOT_THRESHOLD = 0.9995  # mergekit's: above it the two tensors count as colinear


def partner(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The one model merged with the base. A recipe that also lists the base under `models:`
    may reach us with the base's copy among the experts: the other one is the partner (if both
    equal the base, either is)."""
    if experts.shape[0] == 1:
        return experts[0]
    if experts.shape[0] == 2:
        return experts[1] if torch.equal(experts[0], base) else experts[0]
    return experts[0] if experts.shape[0] else base


def slerp_coefficients(t: float, gram: torch.Tensor, eps: float = 1e-8) -> tuple[float, float]:
    """mergekit's slerp weights (c₀, c₁) on the unnormalised v0, v1 from their float64 Gram
    matrix: the angle between v0/‖v0‖ and v1/‖v1‖ (a norm ≤ eps is left unscaled), then
    sin((1−t)θ)/sin θ and sin(tθ)/sin θ, or 1 − t and t where |cos θ| > 0.9995 (colinear)."""
    n0, n1 = math.sqrt(float(gram[0, 0])), math.sqrt(float(gram[1, 1]))
    dot = float(gram[0, 1]) / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's slerp of two fp32 tensors: c₀·v0 + c₁·v1 (see `slerp_coefficients`)."""
    c0, c1 = slerp_coefficients(t, gram64([v0, v1]), eps)
    return c0 * v0 + c1 * v1


def slerp(base: torch.Tensor, experts: torch.Tensor, p: TensorParams, ctx: TensorContext) -> torch.Tensor:
    """Takes the inputs as read (bf16...): one pass for the angle (`gram64`), one fused weighted
    sum c₀·θ₀ + c₁·θ₁ rounded once to the output dtype; no fp32 copy of a whole tensor."""
    other = partner(base, experts)
    c0, c1 = slerp_coefficients(float(p["t"]), gram64([base, other]))
    pair = torch.stack([base.reshape(-1), other.reshape(-1)])
    return kernels.weighted_sum(pair, [c0, c1], False, ctx.out_dtype).reshape(base.shape)


def slerp_workspace(shape: tuple[int, ...], n: int) -> int:
    """The stacked pair (at most fp32) and `gram64`'s chunk buffer."""
    return 2 * math.prod(shape) * 4 + 3 * CHUNK * 4


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    """mergekit's nuslerp: slerp over the flattened tensor, or per row of the last axis
    (`row_wise`: of the first axis), with a per-row fallback to lerp where sin θ < eps."""
    if flatten:
        n0, n1 = max(norm64(v0), 1e-7), max(norm64(v1), 1e-7)
        theta = math.acos(min(1.0, max(-1.0, dot64(v0, v1) / (n0 * n1))))
        if abs(math.sin(theta)) < eps:
            return (1 - t) * v0 + t * v1
        return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)
    a, b = (v0.transpose(0, -1), v1.transpose(0, -1)) if row_wise else (v0, v1)
    cos = (_unit_rows(a) * _unit_rows(b)).sum(dim=-1, keepdim=True)
    theta = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
    merged = torch.where(sin.abs() < eps, (1 - t) * a + t * b, spherical)
    return merged.transpose(0, -1) if row_wise else merged


def nuslerp(
    base: torch.Tensor | None, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    w0, w1 = p.per_model["weight"][:2]
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)  # mergekit's fallback for weights summing to 0
    options = {"row_wise": bool(p["nuslerp_row_wise"]), "flatten": bool(p["nuslerp_flatten"])}
    if base is None:
        return nuslerp_tensors(t, experts[0], experts[1], **options)
    return base + nuslerp_tensors(t, experts[0] - base, experts[1] - base, **options)


T = Param(
    "t",
    0.5,
    False,
    "interpolation factor: 0 gives the base, 1 the other model (in [0, 1])",
    low=0.0,
    high=1.0,
)
NU_WEIGHT = Param("weight", 1.0, True, "relative weight; t = w₂ / (w₁ + w₂)")
ROW_WISE = Param(
    "nuslerp_row_wise", False, False, "slerp each column vector (along the first axis) instead of rows"
)
FLATTEN = Param("nuslerp_flatten", True, False, "slerp the flattened tensor as one vector (else per row)")

register(
    MethodSpec(
        "slerp",
        slerp,
        (T,),
        needs_base=True,
        raw_inputs=True,
        workspace=slerp_workspace,
        summary="spherical interpolation from the base (t = 0) to one other model (t = 1)",
        citation="Shoemake, Animating Rotation with Quaternion Curves, SIGGRAPH 1985; mergekit's slerp",
        check_recipe=rules.all_of(rules.pair_with_base("slerp"), rules.requires("slerp", "t")),
    )
)
register(
    MethodSpec(
        "nuslerp",
        nuslerp,
        (NU_WEIGHT, ROW_WISE, FLATTEN),
        needs_base=False,
        summary="slerp of two models by weight (of their task vectors, with a base), per row or flattened",
        citation="mergekit's nuslerp (Goddard, arcee-ai/mergekit)",
        check_recipe=rules.exactly("nuslerp", 2, base="optional"),
    )
)

__all__ = ["nuslerp", "nuslerp_tensors", "partner", "slerp", "slerp_coefficients", "slerp_tensors"]
