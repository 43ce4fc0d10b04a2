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
from .blocked import dare_source, magnitude_thresholds_source, task_arithmetic, ties_source, weighted_sum
from .source import Source, TensorSource


def ties(src: Source, thresholds: list[float], weights: list[float], lam: float, normalize: bool,
         out_dtype: torch.dtype) -> torch.Tensor:
    """TIES with known thresholds: the fused kernel chunk by chunk where it runs, else torch."""
    if fused.enabled(src.device):
        out = _fused_chunks(src, mode=fused.MODE_TIES, elect=True, weights=weights, lam=lam,
                            normalize=normalize, out_dtype=out_dtype, thresholds=thresholds)
        if out is not None:
            return out
    return ties_source(src, thresholds, weights, lam, normalize, out_dtype)


def dare(src: Source, offset: int, densities: list[float], keys: list[tuple[int, int]], weights: list[float],
         lam: float, normalize: bool, rescale: bool, elect: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """DARE (then sum or TIES election): fused where it runs, else torch."""
    if fused.enabled(src.device):
        out = _fused_chunks(src, mode=fused.MODE_DARE, elect=elect, weights=weights, lam=lam,
                            normalize=normalize, out_dtype=out_dtype, keys=keys, densities=densities,
                            rescale=rescale, offset=offset)
        if out is not None:
            return out
    return dare_source(src, offset, densities, keys, weights, lam, normalize, rescale, elect, out_dtype)


def _fused_chunks(src: Source, **kwargs) -> torch.Tensor | None:
    """The fused kernel over each chunk; None when zero-sum entries need the −1 majority sign
    (known only once every chunk is merged), which the torch path then handles exactly."""
    out = torch.empty(src.numel, dtype=kwargs["out_dtype"], device=src.device)
    balance = undecided = 0
    offset = kwargs.pop("offset", 0)
    for first, base, experts in src.chunks():  # (TIES ignores the offset: it draws nothing)
        part, chunk_balance, chunk_undecided = fused.fused_merge(base, experts, **kwargs, offset=offset + first)
        out[first:first + part.shape[0]] = part
        balance, undecided = balance + chunk_balance, undecided + chunk_undecided
    return None if kwargs["elect"] and undecided and balance < 0 else out


__all__ = ["Source", "TensorSource", "dare", "magnitude_thresholds_source", "task_arithmetic", "ties", "weighted_sum"]
