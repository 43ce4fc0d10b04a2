"""Merge kernels: the hot loops of the element-wise methods.

`blocked` holds the plain-torch implementations (the reference, and the CPU path: it walks
tensors in cache-sized blocks so the half-dozen passes per entry hit L2, not DRAM); `rng` the
counter-based random numbers DARE draws, identical on every device; `fused` (Triton) fused single-pass
GPU versions, used when Triton and a CUDA device are present and checked against `blocked` in
the tests (under TRITON_INTERPRET=1 on CPU). The functions below pick one.
"""

from __future__ import annotations

import torch

from . import fused
from .blocked import dare as dare_blocked
from .blocked import magnitude_thresholds, task_arithmetic, task_vectors, ties_apply, weighted_sum


def ties(base: torch.Tensor, experts: torch.Tensor, thresholds: list[float], weights: list[float], lam: float,
         normalize: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """TIES with known thresholds on flat inputs: the fused kernel where it runs, else torch."""
    if fused.enabled(experts):
        out, balance, undecided = fused.fused_merge(base, experts, mode=fused.MODE_TIES, elect=True, weights=weights,
                                                    lam=lam, normalize=normalize, out_dtype=out_dtype,
                                                    thresholds=thresholds)
        if not (undecided and balance < 0):  # else: zero-sum entries need the −1 majority sign
            return out
    return ties_apply(base, experts, thresholds, weights, lam, normalize, out_dtype)


def dare(base: torch.Tensor, experts: torch.Tensor, offset: int, densities: list[float],
         keys: list[tuple[int, int]], weights: list[float], lam: float, normalize: bool, rescale: bool,
         elect: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """DARE (then sum or TIES election) on flat inputs: fused where it runs, else torch."""
    if fused.enabled(experts):
        out, balance, undecided = fused.fused_merge(base, experts, mode=fused.MODE_DARE, elect=elect, weights=weights,
                                                    lam=lam, normalize=normalize, out_dtype=out_dtype, keys=keys,
                                                    densities=densities, rescale=rescale, offset=offset)
        if not (elect and undecided and balance < 0):
            return out
    return dare_blocked(base, experts, offset, densities, keys, weights, lam, normalize, rescale, elect, out_dtype)


__all__ = ["dare", "magnitude_thresholds", "task_arithmetic", "task_vectors", "ties", "weighted_sum"]
