"""Whole-tensor dot products and norms, accumulated in float64 over bounded chunks.

The spherical methods (slerp, karcher, multislerp, model_stock) decide angles from dot products
over tensors of up to 10⁹ entries; an fp32 accumulation loses digits exactly where arccos is
ill-conditioned (nearly parallel fine-tunes), and a float64 copy of a whole embedding table
would double its memory. Chunks of 2²² entries keep both in check.
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 22


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ aᵢbᵢ over every entry, in float64."""
    a, b = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, a.numel(), CHUNK):
        total += float(torch.dot(a[start : start + CHUNK].double(), b[start : start + CHUNK].double()))
    return total


def norm64(a: torch.Tensor) -> float:
    """‖a‖₂ over every entry, in float64."""
    return math.sqrt(dot64(a, a))
