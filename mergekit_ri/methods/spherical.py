"""Multi-SLERP and the Karcher mean: averages of many models on the sphere, as mergekit does them.

Both treat each whole tensor as one vector: its direction is averaged on the unit sphere and the
result is scaled by the weighted mean of the norms. `multislerp` takes one step in the tangent
space at the weighted mean direction (barycentric slerp, optionally around a base); `karcher`
iterates to the Riemannian (Fréchet) mean of the directions with equal weights.
"""

from __future__ import annotations

import math

from ..errors import UserError
from ..lazy import torch
from .geometry import dot64, norm64
from .registry import MethodSpec, Param, TensorContext, TensorParams, register


def multislerp_tensors(
    points: torch.Tensor, weights: list[float], normalize: bool, eps: float
) -> torch.Tensor:
    """mergekit's multislerp on [N, ...] points (task vectors when there is a base)."""
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = [norm64(x) for x in points]
    units = [x / (n + eps) for x, n in zip(points, norms)]
    mean = sum(float(wi) * u for wi, u in zip(w, units))
    mean_norm = norm64(mean)
    if mean_norm < eps:
        if points.shape[0] == 2:  # mergekit's fallback: linear interpolation
            return float(w[0]) * points[0] + float(w[1]) * points[1]
        raise ValueError("the weighted mean direction is zero (antipodal models with balancing weights)")
    mean = mean / mean_norm
    tangent = sum(float(wi) * (u - dot64(u, mean) * mean) for wi, u in zip(w, units))
    length = norm64(tangent) + eps
    result = math.cos(length) * mean + (math.sin(length) / length) * tangent
    return result * float(sum(float(wi) * n for wi, n in zip(w, norms)))


def multislerp(
    base: torch.Tensor | None, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    if experts.shape[0] == 1:
        return experts[0]
    points = experts - base if base is not None else experts
    try:
        weights, normalize = p.per_model["weight"], bool(p["normalize_weights"])
        merged = multislerp_tensors(points, weights, normalize, float(p["eps"]))
    except ValueError as exc:
        raise UserError(f"multislerp: tensor '{ctx.name}': {exc}; change the weights") from None
    return merged + base if base is not None else merged


def karcher_tensors(points: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's Karcher mean with equal weights: directions averaged on the sphere by Riemannian
    gradient steps (at most `max_iter`, stopping when the step is below `tol`), times the mean norm.
    Tensors with norm ≤ tol are left out of the direction but count (as 0) in the norm."""
    alpha = 1.0 / len(points)
    norms = [norm64(x) for x in points]
    units = [x / n for x, n in zip(points, norms) if n > tol]
    if not units:
        return torch.zeros_like(points[0])
    a = 1.0 / len(units)
    u = sum(a * x for x in units)
    length = norm64(u)
    u = units[0].clone() if length < tol else u / length
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for x in units:
            dot = min(1.0, max(-1.0, dot64(u, x)))
            theta = math.acos(dot)
            if theta >= tol:
                step += (a * theta / math.sin(theta)) * (x - dot * u)
        size = norm64(step)
        if size < tol:
            break
        u = math.cos(size) * u + (math.sin(size) / size) * step
        unit = norm64(u)
        if unit > tol:
            u = u / unit
    return u * (alpha * sum(norms))


def karcher(
    base: torch.Tensor | None, experts: torch.Tensor, p: TensorParams, ctx: TensorContext
) -> torch.Tensor:
    """Every input is a point, the base included when the recipe has one (as in mergekit)."""
    points = ([base] if base is not None else []) + list(experts)
    if len(points) == 1:
        return points[0]
    return karcher_tensors(points, int(p["max_iter"]), float(p["tol"]))


register(
    MethodSpec(
        "multislerp",
        multislerp,
        (
            Param("weight", 1.0, True, "this model's weight in the barycentre"),
            Param("normalize_weights", True, False, "divide the weights by their sum"),
            Param("eps", 1e-8, False, "guard against division by zero norms"),
        ),
        needs_base=False,
        summary="barycentric slerp of any number of models (of task vectors, with a base)",
        citation="Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); mergekit",
    )
)
register(
    MethodSpec(
        "karcher",
        karcher,
        (
            Param("max_iter", 10, False, "most Riemannian gradient steps"),
            Param("tol", 1e-5, False, "stop when a step is shorter; norms below it are zero"),
        ),
        needs_base=False,
        summary="Karcher (Riemannian) mean of the models' directions, times their mean norm",
        citation="Karcher, Riemannian center of mass and mollifier smoothing, CPAM 1977; mergekit's karcher",
    )
)

__all__ = ["karcher", "karcher_tensors", "multislerp", "multislerp_tensors"]
