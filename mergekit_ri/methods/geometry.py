"""Whole-tensor dot products and norms, accumulated in float64 over bounded chunks.

The spherical methods (slerp, karcher, multislerp, model_stock) decide angles from dot products
over tensors of up to 10⁹ entries; an fp32 accumulation loses digits exactly where arccos is
ill-conditioned (nearly parallel fine-tunes), and a float64 copy of a whole embedding table
would double its memory. fp32 products over blocks of 2¹⁴ entries, summed in float64, keep
both in check.
"""

from __future__ import annotations

import math

import torch

BLOCK = 1 << 14
ROWS = 64  # blocks multiplied and summed at once: a 4 MiB temporary


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ aᵢbᵢ over every entry: fp32 sums over blocks of 2¹⁴ entries (a row each, 64 rows at a
    time), summed in float64. Relative error ~10⁻⁸ (one fp32 dot over a whole tensor: ~10⁻⁴),
    no float64 copy of the tensor, and the same bits whatever the thread count: each block is
    summed by one thread in a fixed order (a BLAS dot splits its sum by threads, so a merge on
    one core and on many, or on a Ray worker, would differ in the last bit)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        a, b = a.float(), b.float()
    whole = a.numel() - a.numel() % BLOCK
    step = BLOCK * ROWS
    total = 0.0
    for start in range(0, whole, step):
        end = min(start + step, whole)
        rows = (a[start:end].view(-1, BLOCK) * b[start:end].view(-1, BLOCK)).sum(dim=1)
        total += float(rows.double().sum())
    if whole < a.numel():
        total += float((a[whole:] * b[whole:]).sum())
    return total


def norm64(a: torch.Tensor) -> float:
    """‖a‖₂ over every entry, in float64."""
    return math.sqrt(dot64(a, a))
