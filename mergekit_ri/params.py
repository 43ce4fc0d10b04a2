"""Parameter values per tensor: mergekit's filtered values and layer-depth gradients.

A value is a scalar, a list (a gradient over layer depth `t` in [0, 1]: numbers are
interpolated linearly, true/false and names are stepped through, as mergekit does) or a list of
`{filter, value}` entries (the first entry whose `filter` is a substring of the tensor name wins;
an entry without a filter, or with mergekit's `filter: "*"`, matches everything).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from .recipe import FilteredValue, ParamValue, Scalar

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The block number in names like `model.layers.7.mlp.up_proj.weight`."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def layer_depths(names: Iterable[str]) -> dict[str, float]:
    """Depth t in [0, 1] of every tensor, as mergekit computes it for gradients.

    Layer i of L has t = i / (L - 1). Tensors outside the blocks (embeddings, final norm,
    lm_head) get t = 0, the gradient's first value, as in mergekit 0.1.5.
    """
    names = list(names)
    indices = {n: layer_index(n) for n in names}
    count = max((i for i in indices.values() if i is not None), default=-1) + 1
    depths = {}
    for name, index in indices.items():
        if index is not None:
            depths[name] = index / max(count - 1, 1)
        else:
            depths[name] = 0.0
    return depths


def resolve(value: ParamValue, tensor_name: str, t: float, discrete: bool = False) -> Scalar | None:
    """The scalar a parameter takes for one tensor; None when no filter matched.

    `discrete` (a true/false or named parameter): a gradient is stepped through, never
    interpolated, even when written with 0 and 1; so is any gradient holding true/false or text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if not value:
        return None
    if isinstance(value[0], FilteredValue):
        for entry in value:
            if matches(entry.filter, tensor_name):
                return resolve(entry.value, tensor_name, t, discrete)
        return None
    if discrete or any(isinstance(point, (bool, str)) for point in value):
        return step(value, t)
    return interpolate(value, t)


def matches(pattern: str | None, tensor_name: str) -> bool:
    """mergekit's filter: none or "*" matches every tensor, anything else is a substring test."""
    return pattern is None or pattern == "*" or pattern in tensor_name


def step(points: list[Scalar], t: float) -> Scalar:
    """mergekit's rule for non-numeric gradients: the point at index ⌊t·(n − 1)⌋."""
    return points[min(len(points) - 1, int(t * (len(points) - 1)))]


def interpolate(points: list[float], t: float) -> float:
    """Linear interpolation of evenly spaced `points` at t in [0, 1]."""
    if len(points) == 1:
        return float(points[0])
    scaled = t * (len(points) - 1)
    lo = int(math.floor(scaled))
    hi = min(len(points) - 1, lo + 1)
    frac = scaled - lo
    return (1 - frac) * float(points[lo]) + frac * float(points[hi])
