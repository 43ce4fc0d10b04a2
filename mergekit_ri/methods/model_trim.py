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
from functools import partial

from .. import kernels
from ..errors import UserError
from ..lazy import torch
from .registry import PassScan, Prepass, TensorParams


def reads(params: Sequence[TensorParams]) -> int:
    """Two reads of every merged tensor when any of them asks for `trim_scope: model`, else none."""
    return 2 if any(p.globals.get("trim_scope") == "model" for p in params) else 0


def model_thresholds(params: Sequence[TensorParams], scan: PassScan) -> tuple[float, ...]:
    """Each expert's exact k-th largest |τ_i| over all merged tensors (k = ⌊density·n⌋ with n
    their total size; inf when k = 0, 0 when k = n), from two passes of `scan`."""
    from ..kernels.select import bits_to_float, bucket_of_kth

    densities = {tuple(p.per_model["density"]) for p in params}
    if len(densities) != 1:
        raise UserError(
            "trim_scope: model needs one density per model for all tensors (no filters or gradients)"
        )
    density = next(iter(densities))
    count = len(density)

    high_hist, total = histograms(scan, count, None)
    keep = [int(d * total) for d in density]
    highs, ranks = zip(*(bucket_of_kth(high_hist[i], max(keep[i], 1)) for i in range(count)))
    low_hist, _ = histograms(scan, count, [h if keep[i] > 0 else None for i, h in enumerate(highs)])
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


def histograms(scan: PassScan, count: int, buckets: list[int | None] | None) -> tuple[torch.Tensor, int]:
    """[N, BUCKETS] counts of |τ_i|'s high 16 bits (buckets None) or of the low 16 bits inside
    buckets[i] over one pass, and the entries counted per expert."""
    from ..kernels.select import BUCKETS

    folded = scan(partial(tensor_histograms, buckets), add_histograms)
    if folded is None:
        return torch.zeros((count, BUCKETS), dtype=torch.int64), 0
    return folded


def tensor_histograms(
    buckets: list[int | None] | None, base: torch.Tensor, experts: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """One tensor's part of a pass: its histograms (on the CPU, to travel) and its size."""
    return kernels.magnitude_histograms(base, experts, buckets).cpu(), base.numel()


def add_histograms(a: tuple[torch.Tensor, int], b: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, int]:
    return a[0] + b[0], a[1] + b[1]


MODEL_TRIM = Prepass(reads, model_thresholds)

__all__ = ["MODEL_TRIM", "model_thresholds", "reads"]
