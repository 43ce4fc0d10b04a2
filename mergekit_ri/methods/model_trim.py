"""TIES `trim_scope: model`: each expert's trim threshold over the whole model, before merging.

The TIES paper trims each task vector to its top-k magnitudes over all the model's parameters,
not tensor by tensor (`methods.reference.model_thresholds` says it in three lines). That needs a
pass over every merged tensor before the first can be merged: the ties method declares it as its
`MethodSpec.prepass`, and the engine runs it and hands the thresholds to every tensor's merge
(`TensorContext.prepass`). Memory stays at a few tensors: two streaming passes of a radix select
on the fp32 bit patterns of |τ_i| (histograms of the high, then of the low 16 bits), so each
threshold is exactly the k-th largest magnitude a whole-model sort would give.
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import kernels
from ..errors import UserError
from ..lazy import torch
from .registry import PassStream, Prepass, TensorParams


def reads(params: Sequence[TensorParams]) -> int:
    """Two reads of every merged tensor when any of them asks for `trim_scope: model`, else none."""
    return 2 if any(p.globals.get("trim_scope") == "model" for p in params) else 0


def model_thresholds(params: Sequence[TensorParams], stream: PassStream) -> tuple[float, ...]:
    """Each expert's exact k-th largest |τ_i| over all merged tensors (k = ⌊density·n⌋ with n
    their total size; inf when k = 0, 0 when k = n), from two passes of `stream`."""
    from ..kernels.select import bits_to_float, bucket_of_kth

    densities = {tuple(p.per_model["density"]) for p in params}
    if len(densities) != 1:
        raise UserError(
            "trim_scope: model needs one density per model for all tensors (no filters or gradients)"
        )
    density = next(iter(densities))
    count = len(density)

    sizes: list[int] = []
    high_hist = histograms(stream, count, None, sizes)
    total = sum(sizes)
    keep = [int(d * total) for d in density]
    highs, ranks = zip(*(bucket_of_kth(high_hist[i], max(keep[i], 1)) for i in range(count)))
    low_hist = histograms(stream, count, [h if keep[i] > 0 else None for i, h in enumerate(highs)], [])
    thresholds = []
    for i in range(count):
        if keep[i] <= 0:
            thresholds.append(float("inf"))
        elif keep[i] >= total:
            thresholds.append(0.0)
        else:
            low, _ = bucket_of_kth(low_hist[i], ranks[i])
            thresholds.append(bits_to_float(highs[i], low))
    return tuple(thresholds)


def histograms(
    stream: PassStream, count: int, buckets: list[int | None] | None, sizes: list[int]
) -> torch.Tensor:
    """[N, BUCKETS] counts of |τ_i|'s high 16 bits (buckets None) or of the low 16 bits inside
    buckets[i] over one pass of `stream`, on the inputs' device; each tensor's size into `sizes`."""
    from ..kernels.select import BUCKETS

    hist = None
    for base, experts in stream():
        part = kernels.magnitude_histograms(base, experts, buckets)
        hist = part if hist is None else hist.add_(part)
        sizes.append(base.numel())
    return hist if hist is not None else torch.zeros((count, BUCKETS), dtype=torch.int64)


MODEL_TRIM = Prepass(reads, model_thresholds)

__all__ = ["MODEL_TRIM", "model_thresholds", "reads"]
