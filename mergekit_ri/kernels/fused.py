"""Fused single-pass GPU kernels (Triton) for TIES, DARE-linear and DARE-TIES.

One program reads a block of the base and of every expert in their file dtype, and writes the
merged block once, in the output dtype: the torch path makes several passes over N fp32 copies.
The maths is that of `blocked` (the reference these are tested against, under TRITON_INTERPRET=1
on CPU), including the DARE generator of `rng`, here in native uint32 arithmetic, so the GPU
keeps exactly the entries the CPU keeps.

TIES's zero-sum rule needs the tensor's majority sign, known only at the end: the kernel counts
Σ sign(Σ_i w_i τ_i) with atomics, flags the "undecided" entries (zero sum, some non-zero τ_i,
merged with +1) and stores their merge with −1 beside; if the majority turns out negative the
caller writes those (no re-read). They are not rare: bf16 task vectors cancel exactly in a few %
of entries. Everything here is optional: without Triton,
or with RI_MERGE_KERNELS=torch, the torch kernels run on the GPU instead. Task arithmetic and
linear stay on torch on the GPU: they are a couple of memory-bound passes already, and torch's
GPU and CPU kernels (and the C kernels, held to them) give bit-identical results.
"""

from __future__ import annotations

import os

import torch

from .blocked import rescale_factor
from .rng import keep_threshold

BLOCK = 1024
MODE_TIES, MODE_DARE = 1, 2


def enabled(device: torch.device) -> bool:
    """Whether the fused kernels run on this device: CUDA when Triton imports, unless
    RI_MERGE_KERNELS=torch. (The tests call `fused_merge` on CPU tensors under TRITON_INTERPRET=1.)"""
    if os.environ.get("RI_MERGE_KERNELS", "auto") == "torch" or device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _merge_kernel():
    """Imported on first use, so that TRITON_INTERPRET set by a test before then takes effect."""
    from .fused_triton import merge

    return merge


def fused_merge(
    base: torch.Tensor,
    experts: torch.Tensor,
    *,
    mode: int,
    elect: bool,
    weights: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype,
    thresholds: list[float] | None = None,
    keys: list[tuple[int, int]] | None = None,
    densities: list[float] | None = None,
    rescale: bool = True,
    offset: int = 0,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """One pass of TIES (mode 1) or DARE (mode 2) over flat base [n] and experts [N, n], into
    `out` (contiguous [n], out_dtype) when given.

    Returns (merged [n] in out_dtype, Σ sign of the elected sums, indices of the undecided entries,
    their merged values with γ = −1 in fp32)."""
    import triton

    count, numel = experts.shape
    device = experts.device
    base, experts = base.contiguous(), experts.contiguous()
    out = torch.empty(numel, dtype=out_dtype, device=device) if out is None else out
    stats = torch.zeros(2, dtype=torch.int32, device=device)
    flags = torch.empty(numel if elect else 1, dtype=torch.int8, device=device)
    minus = torch.empty(numel if elect else 1, dtype=torch.float32, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    weight_t = torch.tensor(weights, **f32)
    threshold_t = torch.tensor(thresholds if thresholds is not None else [0.0] * count, **f32)
    keeps = densities if densities is not None else [1.0] * count
    keep_t = torch.tensor(keeps, **f32)
    inverse_t = torch.tensor([rescale_factor(d) if d > 0 else 0.0 for d in keeps], **f32)
    key_t = torch.tensor(
        [k for pair in (keys or [(0, 0)] * count) for k in pair], dtype=torch.int64, device=device
    )
    below_t = torch.tensor([keep_threshold(d) for d in keeps], dtype=torch.int64, device=device)
    sum_scale = 1.0
    if not elect and normalize:
        total = sum(weights)
        sum_scale = 1.0 / (total if abs(total) >= 1e-8 else 1.0)
    if numel:
        grid = (triton.cdiv(numel, BLOCK),)
        _merge_kernel()[grid](
            base,
            experts,
            out,
            stats,
            flags,
            minus,
            numel,
            offset,
            float(lam),
            float(sum_scale),
            threshold_t,
            weight_t,
            key_t,
            below_t,
            keep_t,
            inverse_t,
            N=count,
            MODE=mode,
            ELECT=elect,
            NORMALIZE=normalize,
            RESCALE=rescale,
            BLOCK=BLOCK,
        )
    balance, undecided = (int(v) for v in stats.tolist())
    where = flags.nonzero().reshape(-1) if undecided else torch.empty(0, dtype=torch.int64, device=device)
    return out, balance, where, minus[where]
