"""Whole-tensor dot products and norms, accumulated in float64 over bounded chunks.

The spherical methods (slerp, karcher, multislerp, model_stock) decide angles from dot products
over tensors of up to 10⁹ entries; an fp32 accumulation loses digits exactly where arccos is
ill-conditioned (nearly parallel fine-tunes), and a float64 copy of a whole embedding table
would double its memory. So the inputs (in any float dtype: bf16 as read from the file, fp32)
are upcast a chunk of 2¹⁸ entries at a time into one fp32 buffer, each chunk's products summed
in fp32 over blocks of 256 entries by one batched matrix product, and the blocks' sums added in
float64: relative error ~10⁻⁸ or better (one fp32 sum over 10⁶ entries: ~5·10⁻⁶), one pass over
the inputs for all k(k+1)/2 products of k tensors, and no copy of a whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..kernels.parallel import run_blocks, workers

BLOCK = 1 << 8  # entries summed in fp32 (one row of a batched matrix product)
CHUNK = 1 << 18  # entries per tensor upcast to fp32 at a time (k rows of 1 MiB: in L2)


def gram64(rows: Sequence[torch.Tensor], center: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 [k, k] matrix of ⟨xᵢ − c, xⱼ − c⟩ over every entry of k same-sized tensors
    (any float dtypes; c = `center`, or 0), in one chunked pass; on the inputs' device. On a CPU
    the chunks are shared among the kernels' block workers (`kernels.parallel`); the chunks'
    sums are added in chunk order, so the result does not depend on the number of threads."""
    flat = [r.reshape(-1) for r in rows]
    middle = center.reshape(-1) if center is not None else None
    k, n, device = len(flat), flat[0].numel(), flat[0].device
    size = max(min(CHUNK, n), 1)
    chunks = [(start, min(start + size, n)) for start in range(0, n, size)]
    spread = workers() if device.type == "cpu" else 1
    per = -(-len(chunks) // max(1, min(spread, len(chunks))))
    groups = [(g, min(g + per, len(chunks))) for g in range(0, len(chunks), per)]

    def group(first: int, last: int) -> list[torch.Tensor]:
        buffer = torch.empty(k, size, dtype=torch.float32, device=device)
        shift = torch.empty(size, dtype=torch.float32, device=device) if middle is not None else None
        out = []
        for start, stop in chunks[first:last]:
            x = buffer[:, : stop - start]
            for i, row in enumerate(flat):
                x[i].copy_(row[start:stop])
            if middle is not None and shift is not None:
                x.sub_(shift[: stop - start].copy_(middle[start:stop]))
            out.append(_chunk_gram(x))
        return out

    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for part in run_blocks(group, groups):
        for chunk in part:
            gram += chunk
    return gram


def _chunk_gram(x: torch.Tensor) -> torch.Tensor:
    """x xᵀ for an fp32 [k, m] chunk: fp32 over blocks of BLOCK entries, float64 across them."""
    k, m = x.shape
    blocks = m // BLOCK
    head = blocks * BLOCK
    total = torch.zeros(k, k, dtype=torch.float64, device=x.device)
    if blocks:
        xb = x[:, :head].reshape(k, blocks, BLOCK).transpose(0, 1)  # [blocks, k, BLOCK]
        total += torch.bmm(xb, xb.transpose(1, 2)).sum(0, dtype=torch.float64)
    if head < m:
        tail = x[:, head:]
        total += (tail @ tail.T).double()
    return total


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ aᵢbᵢ over every entry, in float64 (see `gram64`)."""
    return float(gram64([a, b])[0, 1])


def norm64(a: torch.Tensor) -> float:
    """‖a‖₂ over every entry, in float64."""
    return math.sqrt(float(gram64([a])[0, 0]))


__all__ = ["BLOCK", "CHUNK", "dot64", "gram64", "norm64"]
