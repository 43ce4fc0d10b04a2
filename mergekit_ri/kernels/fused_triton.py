"""The Triton source of the fused kernels (see `fused`): module-level @triton.jit functions,
imported only when a fused kernel first runs."""

import triton
import triton.language as tl


@triton.jit
def mul32(x, c: tl.constexpr):
    return x * tl.full(x.shape, c, tl.uint32)


@triton.jit
def mix32(x):
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@triton.jit
def weighted_tau(
    base,
    experts_ptr,
    i,
    n,
    offs,
    mask,
    offset,
    thresholds_ptr,
    weights_ptr,
    keys_ptr,
    below_ptr,
    keep_ptr,
    inverse_ptr,
    MODE: tl.constexpr,
    RESCALE: tl.constexpr,
):
    """w_i · τ_i after TIES trimming (MODE 1) or DARE dropping (MODE 2)."""
    e = tl.load(experts_ptr + i * n + offs, mask=mask, other=0.0).to(tl.float32)
    tau = e - base
    if MODE == 1:
        tau = tl.where(tl.abs(tau) >= tl.load(thresholds_ptr + i), tau, 0.0)
    if MODE == 2:
        keep = tl.load(keep_ptr + i)
        if keep < 1.0:
            k0 = tl.load(keys_ptr + 2 * i).to(tl.uint32)
            k1 = tl.load(keys_ptr + 2 * i + 1).to(tl.uint32)
            index = (offs + offset).to(tl.uint32)
            h = mix32(mix32(index ^ k0) ^ k1)
            tau = tl.where((h >> 8) < tl.load(below_ptr + i).to(tl.uint32), tau, 0.0)
            if RESCALE:
                if keep > 0.0:
                    tau = tau * tl.load(inverse_ptr + i)
    return tau * tl.load(weights_ptr + i)


@triton.jit
def merge(
    base_ptr,
    experts_ptr,
    out_ptr,
    stats_ptr,
    flags_ptr,
    minus_ptr,
    n,
    offset,
    lam,
    sum_scale,
    thresholds_ptr,
    weights_ptr,
    keys_ptr,
    below_ptr,
    keep_ptr,
    inverse_ptr,
    N: tl.constexpr,
    MODE: tl.constexpr,
    ELECT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    RESCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        total += weighted_tau(
            base,
            experts_ptr,
            i,
            n,
            offs,
            mask,
            offset,
            thresholds_ptr,
            weights_ptr,
            keys_ptr,
            below_ptr,
            keep_ptr,
            inverse_ptr,
            MODE,
            RESCALE,
        )
    if ELECT:
        gamma = tl.where(total < 0.0, -1.0, 1.0)
        mixed = tl.zeros([BLOCK], dtype=tl.float32)
        count = tl.zeros([BLOCK], dtype=tl.float32)
        minus = tl.zeros([BLOCK], dtype=tl.float32)  # the merge with γ = −1, for zero sums
        minus_count = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(N):  # the second read of each block comes from cache
            wt = weighted_tau(
                base,
                experts_ptr,
                i,
                n,
                offs,
                mask,
                offset,
                thresholds_ptr,
                weights_ptr,
                keys_ptr,
                below_ptr,
                keep_ptr,
                inverse_ptr,
                MODE,
                RESCALE,
            )
            agree = (wt * gamma) > 0.0
            mixed += tl.where(agree, wt, 0.0)
            count += tl.where(agree, tl.load(weights_ptr + i), 0.0)
            negative = wt < 0.0
            minus += tl.where(negative, wt, 0.0)
            minus_count += tl.where(negative, tl.load(weights_ptr + i), 0.0)
        if NORMALIZE:
            mixed = mixed / tl.where(tl.abs(count) < 1e-8, 1.0, count)
            minus = minus / tl.where(tl.abs(minus_count) < 1e-8, 1.0, minus_count)
        signs = tl.where(total > 0.0, 1, tl.where(total < 0.0, -1, 0))
        tl.atomic_add(stats_ptr, tl.sum(tl.where(mask, signs, 0), axis=0))
        undecided = mask & (total == 0.0) & (mixed != 0.0)
        tl.atomic_add(stats_ptr + 1, tl.sum(undecided.to(tl.int32), axis=0))
        tl.store(flags_ptr + offs, undecided.to(tl.int8), mask=mask)
        tl.store(minus_ptr + offs, base + lam * minus, mask=undecided)
    else:
        mixed = total * sum_scale
    merged = base + lam * mixed
    tl.store(out_ptr + offs, merged.to(out_ptr.dtype.element_ty), mask=mask)
