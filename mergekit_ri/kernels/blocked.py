"""Plain-torch merge kernels over raw (bf16/fp16/fp32) stacked inputs, block by block.

Each function takes the base as a flat tensor [n] and the experts as [N, n] in their file dtype
and returns the merged [n] in `out_dtype` (fp32 maths, one rounding on the store). On the CPU the entries are walked in blocks of BLOCK so the
N fp32 task-vector rows of a block stay in L2 while the half-dozen passes of a method run over
them (twice as fast as whole-tensor passes through DRAM, and no N×fp32 copy of a tensor is ever
held); on a GPU one block is the whole tensor. Upcasting happens inside each block's subtraction,
so nothing is converted twice. The maths is that of `methods.reference` (the readable version,
which these equal bit for bit: tests/test_reference.py); the C and Triton kernels do the same
operations in the same order.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from .parallel import run_blocks
from .rng import keep_mask, keep_mask_at
from .select import BUCKETS, SMALL, bits_to_float, bucket_of_kth, kth_largest_magnitude, magnitude_histograms
from .source import Source, TensorSource

T = TypeVar("T")

BLOCK = 1 << 18  # entries per block on the CPU: 3 experts × 1 MiB of fp32 fits a 2 MiB L2
BAND_ENTRIES = 1 << 20  # |τ| values a threshold search collects at most, over all experts (4 MiB)


def spans(numel: int, device: torch.device) -> list[tuple[int, int]]:
    """Blocks of BLOCK entries on the CPU; the whole tensor as one block elsewhere."""
    step = numel if device.type != "cpu" else BLOCK
    return [(start, min(start + step, numel)) for start in range(0, numel, max(step, 1))]


def for_blocks(numel: int, device: torch.device, fn: Callable[[int, int], T]) -> list[T]:
    """fn(start, stop) over the blocks of a tensor, in order; on the CPU the blocks are shared
    among `workers()` threads (see `parallel`), each running its torch ops single-threaded."""
    return (
        run_blocks(fn, spans(numel, device))
        if device.type == "cpu"
        else [fn(a, b) for a, b in spans(numel, device)]
    )


def task_vectors(base: torch.Tensor, experts: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """τ_i = θ_i − θ0 for entries [start, stop), in fp32, in one pass."""
    return torch.sub(
        experts[:, start:stop],
        base[start:stop].float(),
        out=torch.empty((experts.shape[0], stop - start), dtype=torch.float32, device=experts.device),
    )


def column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).reshape(-1, 1)


def weigh(x: torch.Tensor, w: torch.Tensor, unit: bool) -> torch.Tensor:
    """x · w per row, in place; skipped when every weight is 1, the usual case (exact: x · 1 = x,
    and a third of task arithmetic's time)."""
    return x if unit else x.mul_(w)


def all_ones(values: list[float]) -> bool:
    return all(v == 1.0 for v in values)


def safe_divisor(total: torch.Tensor) -> torch.Tensor:
    return torch.where(total.abs() < 1e-8, torch.ones_like(total), total)


def weighted_sum(
    experts: torch.Tensor, weights: list[float], normalize: bool, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Σ w_i θ_i (/ Σ w_i): model soup, no base."""
    out = torch.empty(experts.shape[1], dtype=out_dtype, device=experts.device)
    w, unit = column(weights, experts), all_ones(weights)
    scale = 1.0 / float(safe_divisor(w.sum())) if normalize else 1.0

    def block(start: int, stop: int) -> None:
        rows = experts[:, start:stop].to(
            torch.float32, copy=True
        )  # weigh() works in place: never on the input
        torch.mul(rows_sum(weigh(rows, w, unit)), scale, out=out[start:stop])

    for_blocks(out.numel(), experts.device, block)
    return out


def task_arithmetic(
    base: torch.Tensor,
    experts: torch.Tensor,
    weights: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """θ0 + λ Σ w_i τ_i (/ Σ w_i)."""
    out = torch.empty(base.shape[0], dtype=out_dtype, device=base.device)
    w, unit = column(weights, experts), all_ones(weights)
    scale = lam / float(safe_divisor(w.sum())) if normalize else lam

    def block(start: int, stop: int) -> None:
        mixed = rows_sum(weigh(task_vectors(base, experts, start, stop), w, unit))
        torch.add(base[start:stop], mixed, alpha=scale, out=out[start:stop])

    for_blocks(out.numel(), base.device, block)
    return out


def disjoint_merge(
    weighted: torch.Tensor, gamma: torch.Tensor, weights: torch.Tensor, normalize: bool, unit: bool = False
) -> torch.Tensor:
    """TIES step 3 on [N, m] weighted task vectors (overwritten) and elected signs γ = ±1: the
    (weighted) mean of the entries that agree with γ (γ·wτ_i > 0; zero entries never agree).

    Written as γ · Σ relu(γ·wτ_i) so that no boolean tensor is made: on the CPU, float ops
    vectorise and bool ones do not (this is 5x faster than masks)."""
    agreeing = weighted.mul_(gamma).relu_()
    mixed = rows_sum(agreeing)
    if normalize:
        count = rows_sum(weigh(agreeing.sign_(), weights.reshape(-1, 1), unit))
        # with weights >= 1e-8 a count below 1e-8 is an exact 0 where the merge is 0 too, so a
        # clamp gives what the reference's "divide by 1 there" gives, without a select
        mixed.div_(count.clamp_(min=1e-8) if unit or float(weights.min()) >= 1e-8 else safe_divisor(count))
    return mixed.mul_(gamma)


def rows_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the first axis of [N, m] as a chain of contiguous adds, row 0 first: the order a
    dim-0 sum uses, at half its cost on a CPU, and the same on every device."""
    out = x[0].clone() if x.shape[0] == 1 else torch.add(x[0], x[1])
    for i in range(2, x.shape[0]):
        out.add_(x[i])
    return out


def exact_sum(x: torch.Tensor) -> float:
    """Sum of integer-valued floats, exact: fp32 below 2^24 entries (a CPU block), else fp64."""
    return float(x.sum() if x.numel() < 1 << 24 else x.sum(dtype=torch.float64))


def count_nonzero(x: torch.Tensor) -> int:
    """Non-zero entries of a float tensor; sign() of |x| summed, which vectorises on the CPU
    where `count_nonzero` branches per entry (5x slower on sparse data)."""
    return int(exact_sum(x.abs().sign_()))


class Election:
    """TIES sign election over a tensor merged block by block.

    γ = sign(Σ_i w_i τ_i). Where that sum is exactly 0 but some τ_i is not ("undecided"), γ is
    the majority sign of the *whole tensor* (+1 if that is 0 too; see `methods.reference`), which
    a block cannot know yet: such entries are merged with +1, and their merge with −1 is kept
    beside them, to be written by `finish` if the majority turns out negative. The C and Triton
    kernels keep both values the same way: no backend re-reads its inputs for this rule.
    """

    def __init__(self, weights: torch.Tensor, normalize: bool) -> None:
        self.weights, self.normalize = weights, normalize
        self.unit = bool((weights == 1.0).all())
        self.balance = 0  # Σ sign(Σ_i w_i τ_i) over the tensor so far
        self.undecided: list[tuple[torch.Tensor, torch.Tensor]] = []  # (flat indices, merge with γ = −1)
        self._lock = threading.Lock()  # blocks are merged by several threads

    def merge(
        self, weighted: torch.Tensor, start: int, minus: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The disjoint merge of a block's weighted task vectors [N, m] (overwritten), which sit at
        flat entries start.. ; `minus(local)` gives the output value (θ0 + λ·τ_m, fp32) of the
        block's entries `local` merged with γ = −1, asked for the undecided ones only."""
        total = rows_sum(weighted)
        nonzero = count_nonzero(total)
        total.add_(0.0)  # −0 → +0, so that zero sums get γ = +1 below
        gamma = torch.ones_like(total).copysign_(total)
        balance = int(exact_sum(gamma)) - (total.numel() - nonzero)
        mixed = disjoint_merge(weighted, gamma, self.weights, self.normalize, self.unit)
        # where the sum is non-zero some entry agrees, so the merge is non-zero: any other
        # non-zero merged entry had a zero sum with non-zero entries, i.e. an undecided sign
        undecided = None
        if count_nonzero(mixed) > nonzero:
            local = ((total == 0) & (mixed != 0)).nonzero().reshape(-1)
            undecided = (local + start, minus(local))
        with self._lock:
            self.balance += balance
            if undecided is not None:
                self.undecided.append(undecided)
        return mixed

    def minus(self, weighted: torch.Tensor) -> torch.Tensor:
        """The disjoint merge of weighted task vectors [N, k] (overwritten) with γ = −1."""
        gamma = torch.full((weighted.shape[1],), -1.0, device=weighted.device)
        return disjoint_merge(weighted, gamma, self.weights, self.normalize, self.unit)

    def finish(self, out: torch.Tensor, majority: int | None = None) -> torch.Tensor:
        """Write the undecided entries' merge with γ = −1 if the tensor's majority is negative:
        the balance of what was merged here, or `majority`, the whole tensor's balance when
        this is one block of it (`election_balance`)."""
        if (self.balance if majority is None else majority) < 0 and self.undecided:
            out[torch.cat([where for where, _ in self.undecided])] = torch.cat(
                [values for _, values in self.undecided]
            ).to(out.dtype)
        return out


def trim(tau: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """TIES step 1 on [N, m]: keep τ_i entries with |τ_i| >= t_i, zero the rest (float ops only:
    `threshold` keeps |τ| > the float just below t, `copysign` restores the signs)."""
    magnitude = tau.abs()
    for i, t in enumerate(thresholds):
        F.threshold(magnitude[i], float_below(t), 0.0, inplace=True)
    return magnitude.copysign_(tau)


def float_below(value: float) -> float:
    """The largest fp32 below `value` (for value > 0): `x > float_below(t)` ⟺ `x >= t` in fp32."""
    if value <= 0.0 or math.isinf(value):
        return value if value <= 0.0 else torch.finfo(torch.float32).max
    t = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(t, torch.zeros_like(t)))


def ties_apply(
    base: torch.Tensor,
    experts: torch.Tensor,
    thresholds: list[float],
    weights: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """TIES with known per-expert magnitude thresholds: keep |τ_i| >= t_i, elect, disjoint mean."""
    return ties_source(TensorSource(base, experts), thresholds, weights, lam, normalize, out_dtype)


WeightedTau = Callable[[torch.Tensor, "int | torch.Tensor"], torch.Tensor]


def ties_weighting(thresholds: list[float], weights: list[float], device: torch.device) -> WeightedTau:
    """TIES's trim then weights, in place on fp32 task vectors [N, m]."""
    w, unit = column(weights, torch.empty(0, device=device)), all_ones(weights)
    return lambda tau, at: weigh(trim(tau, thresholds), w, unit)


def dare_weighting(
    offset: int,
    densities: list[float],
    keys: list[tuple[int, int]],
    weights: list[float],
    rescale: bool,
    device: torch.device,
) -> WeightedTau:
    """DARE's drop-and-rescale then weights, in place on fp32 task vectors [N, m] whose entries
    sit at `at` (a first index or each index) in a source starting at flat index `offset`."""
    w, unit = column(weights, torch.empty(0, device=device)), all_ones(weights)
    return lambda tau, at: weigh(dare_drop(tau, at + offset, densities, keys, rescale), w, unit)


def ties_source(
    src: Source,
    thresholds: list[float],
    weights: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype = torch.float32,
    majority: int | None = None,
) -> torch.Tensor:
    """`ties_apply` over a `Source`, chunk by chunk, block by block (`majority`: see `Election`)."""
    weighted_tau = ties_weighting(thresholds, weights, src.device)
    return merge_blocks(src, weighted_tau, weights, lam, normalize, True, out_dtype, majority)


def merge_blocks(
    src: Source,
    weighted_tau: WeightedTau,
    weights: list[float],
    lam: float,
    normalize: bool,
    elect: bool,
    out_dtype: torch.dtype,
    majority: int | None = None,
) -> torch.Tensor:
    """θ0 + λ · merge of w_i τ_i over a source, block by block: a TIES election (elect) or a sum.

    `weighted_tau(tau, at)` trims or drops and weighs fp32 task vectors [N, m] in place; `at` is
    the flat index of their first entry (a block) or the indices of each entry (undecided ones).
    `majority`: the whole tensor's sign balance when the source is a block of its rows."""
    out = torch.empty(src.numel, dtype=out_dtype, device=src.device)
    w = column(weights, torch.empty(0, device=src.device))
    election = Election(w, normalize)
    for first, base, experts in src.chunks():

        def block(start: int, stop: int) -> None:
            tau = weighted_tau(task_vectors(base, experts, start, stop), first + start)
            if elect:
                mixed = election.merge(tau, first + start, lambda local: minus(local + start))
            else:
                mixed = rows_sum(tau)
                if normalize:
                    mixed /= safe_divisor(w.sum())
            torch.add(base[start:stop], mixed, alpha=lam, out=out[first + start : first + stop])

        def minus(at: torch.Tensor) -> torch.Tensor:
            """θ0 + λ·τ_m with γ = −1 at entries `at` of this chunk, from the inputs in memory."""
            theta0 = base[at].float()
            tau = weighted_tau(torch.sub(experts[:, at], theta0), at + first)
            return theta0.add_(election.minus(tau), alpha=lam)

        for_blocks(base.shape[0], src.device, block)
    return election.finish(out, majority) if elect else out


def election_balance(src: Source, weighted_tau: WeightedTau) -> int:
    """The TIES election's balance over a whole source — Σ sign(Σ_i w_i τ_i), zero sums counted
    as 0 — without merging anything: what `Election` sums up, for merging the tensor's rows block
    by block afterwards with the whole tensor's majority (`merge_blocks(majority=...)`)."""
    parts: list[int] = []
    lock = threading.Lock()
    for first, base, experts in src.chunks():

        def block(start: int, stop: int) -> None:
            total = rows_sum(weighted_tau(task_vectors(base, experts, start, stop), first + start))
            balance = int((total > 0).sum()) - int((total < 0).sum())  # a NaN (`warn`) counts neither
            with lock:
                parts.append(balance)

        for_blocks(base.shape[0], src.device, block)
    return sum(parts)


SAMPLE = 1 << 15  # entries per expert sampled to bracket the threshold


def magnitude_thresholds(base: torch.Tensor, experts: torch.Tensor, densities: list[float]) -> list[float]:
    """`magnitude_thresholds_source` of tensors in memory."""
    return magnitude_thresholds_source(TensorSource(base, experts), densities)


def magnitude_thresholds_source(
    src: Source, densities: list[float], ops: SelectOps | None = None
) -> list[float]:
    """Each expert's exact k-th largest |τ_i| (k = ⌊density·n⌋; inf keeps nothing, 0 keeps all).

    A strided sample brackets the k-th value in a narrow band [lo, hi); one blocked pass counts
    the entries >= hi and collects those inside the band (at most BAND_ENTRIES values over all
    experts), and the exact k-th value is selected among those few. If the bracket misses (odd
    value distributions, blocks of tied bf16 magnitudes) or the band is too wide, a radix select
    streamed over the source's chunks (two histogram passes) gives the answer instead, in constant
    memory. Either way the result equals `kthvalue`. `ops` holds the counting pass, the selection
    and the histograms (torch's here, or the C kernels').
    """
    ops = ops or TORCH_SELECT
    count, numel = src.count, src.numel
    keeps = [int(d * numel) for d in densities]
    result: list[float | None] = [float("inf") if k <= 0 else 0.0 if k >= numel else None for k in keeps]
    todo = [i for i in range(count) if result[i] is None]
    if not todo:
        return [float(r) for r in result]
    if numel <= SMALL:
        tau = torch.cat([task_vectors(b, e, 0, b.shape[0]) for _, b, e in src.chunks()], dim=1).abs_()
        for i in todo:
            result[i] = ops.kth_largest(tau[i], keeps[i])
        return [float(r) for r in result]
    sample_base, sample_experts = src.sample(SAMPLE)
    sample = torch.sub(sample_experts, sample_base.float()).abs_()
    size = sample.shape[1]
    lo, hi = [float("inf")] * count, [float("inf")] * count  # experts not to do: an empty band
    for i in todo:
        q = keeps[i] / numel
        rank = q * size
        margin = 6.0 * (rank * (1 - q)) ** 0.5 + 8
        # the (position+1)-th largest sampled |τ_i| on either side of the expected rank
        hi[i] = (
            ops.kth_largest(sample[i], max(0, int(rank - margin)) + 1) if rank - margin >= 1 else float("inf")
        )
        lo[i] = ops.kth_largest(sample[i], min(size - 1, int(rank + margin)) + 1)
    # a band wider than this is not worth collecting (nor holding): select over everything
    limit = max(1, min(numel // 8, BAND_ENTRIES // count))
    above_all = [0] * count
    parts: list[list[torch.Tensor] | None] = [[] if i in todo else None for i in range(count)]
    for _, base, experts in src.chunks():
        above, bands = ops.band(base, experts, lo, hi, limit)
        for i in todo:
            kept = parts[i]
            if kept is None:
                continue
            above_all[i] += above[i]
            if bands[i] is None or sum(p.numel() for p in kept) + bands[i].numel() > limit:
                # wider than `limit` over the chunks so far: dropped now, not held to the end (small
                # chunks under a tight cap would otherwise pile up the whole |τ| of a tied band)
                parts[i], lo[i], hi[i] = None, float("inf"), float("inf")
            else:
                kept.append(bands[i])
    missed = []
    for i in todo:
        kept = parts[i]
        rank = keeps[i] - above_all[i]
        if kept is not None and 0 < rank <= sum(p.numel() for p in kept):
            result[i] = ops.kth_largest(torch.cat(kept), rank)
        else:
            missed.append(i)
    del parts
    if missed:  # the bracket missed: an exact radix select over these experts' whole |τ_i|
        for i, value in streamed_kth_largest(src, {i: keeps[i] for i in missed}, ops.histograms).items():
            result[i] = value
    return [float(r) for r in result]


def streamed_kth_largest(src: Source, keeps: dict[int, int], histograms: Histograms) -> dict[int, float]:
    """Expert i's exact keeps[i]-th largest |τ_i| (1 <= keeps[i] < n), by a radix select on the fp32
    bit patterns streamed over the source: a pass of histograms of the high 16 bits, then one of
    the low 16 bits inside the bucket that holds the k-th value. Memory: the histograms."""

    def counts(buckets: list[int | None] | None) -> torch.Tensor:
        total = torch.zeros((src.count, BUCKETS), dtype=torch.int64, device=src.device)
        for _, base, experts in src.chunks():
            total += histograms(base, experts, buckets)
        return total

    wanted: list[int | None] = [None] * src.count
    high = counts(None)
    ranks = {}
    for i, k in keeps.items():
        wanted[i], ranks[i] = bucket_of_kth(high[i], k)
    low = counts(wanted)
    return {i: bits_to_float(wanted[i], bucket_of_kth(low[i], ranks[i])[0]) for i in keeps}


BandCounter = Callable[
    [torch.Tensor, torch.Tensor, list[float], list[float], int], tuple[list[int], list[torch.Tensor | None]]
]


Histograms = Callable[[torch.Tensor, torch.Tensor, "list[int | None] | None"], torch.Tensor]


@dataclass(frozen=True)
class SelectOps:
    """The threshold search's primitives: the counting pass over a chunk (`band_counts`), the k-th
    largest (1-based) of a 1-D tensor of non-negative values, and the radix select's histograms
    of a chunk (`select.magnitude_histograms`)."""

    band: BandCounter
    kth_largest: Callable[[torch.Tensor, int], float]
    histograms: Histograms = magnitude_histograms


def band_counts(
    base: torch.Tensor, experts: torch.Tensor, lo: list[float], hi: list[float], limit: int
) -> tuple[list[int], list[torch.Tensor | None]]:
    """The threshold search's counting pass over flat base [n] and experts [N, n]: per expert, the
    number of |τ_i| >= hi_i and the values with lo_i <= |τ_i| < hi_i (None if more than `limit`)."""

    def block(start: int, stop: int) -> list[tuple[int, torch.Tensor]]:
        tau = task_vectors(base, experts, start, stop).abs_()
        found = []
        for i, row in enumerate(tau):
            high = row >= hi[i]
            found.append((int(high.sum()), row[(row >= lo[i]) ^ high]))  # lo <= |τ| < hi, as hi >= lo
        return found

    per_block = for_blocks(base.shape[0], base.device, block)
    above = [sum(b[i][0] for b in per_block) for i in range(experts.shape[0])]
    sizes = [sum(b[i][1].numel() for b in per_block) for i in range(experts.shape[0])]
    bands = [
        torch.cat([b[i][1] for b in per_block]) if sizes[i] <= limit else None
        for i in range(experts.shape[0])
    ]
    return above, bands


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest (1-based) of non-negative values: torch's selection, or radix when big."""
    return kth_largest_magnitude(values.to(torch.float32).reshape(-1).view(torch.int32), k)


TORCH_SELECT = SelectOps(band_counts, kth_largest)


def rescale_factor(keep: float) -> float:
    """1/keep rounded to fp32: DARE multiplies by it everywhere, since CUDA's division by a scalar
    is itself a multiplication by the reciprocal, and one rule keeps every device bit-identical."""
    return float(torch.tensor(1.0 / keep, dtype=torch.float32))


def dare_drop(
    tau: torch.Tensor,
    at: int | torch.Tensor,
    densities: list[float],
    keys: list[tuple[int, int]],
    rescale: bool,
) -> torch.Tensor:
    """DARE in place on [N, m] task vectors at flat entries `at` (a first index, or each index)."""
    for i, keep in enumerate(densities):
        if keep >= 1.0:
            continue
        if isinstance(at, int):
            mask = keep_mask(at, tau.shape[1], keep, keys[i], tau.device)
        else:
            mask = keep_mask_at(at, keep, keys[i])
        tau[i].mul_(mask)
        if rescale and keep > 0:
            tau[i].mul_(rescale_factor(keep))
    return tau


def dare(
    base: torch.Tensor,
    experts: torch.Tensor,
    offset: int,
    densities: list[float],
    keys: list[tuple[int, int]],
    weights: list[float],
    lam: float,
    normalize: bool,
    rescale: bool,
    elect: bool,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DARE drop-and-rescale, then a weighted sum (dare_linear) or TIES election (dare_ties)."""
    return dare_source(
        TensorSource(base, experts),
        offset,
        densities,
        keys,
        weights,
        lam,
        normalize,
        rescale,
        elect,
        out_dtype,
    )


def dare_source(
    src: Source,
    offset: int,
    densities: list[float],
    keys: list[tuple[int, int]],
    weights: list[float],
    lam: float,
    normalize: bool,
    rescale: bool,
    elect: bool,
    out_dtype: torch.dtype = torch.float32,
    majority: int | None = None,
) -> torch.Tensor:
    """`dare` over a `Source`; `offset` is the flat index of the source's first entry."""
    weighted_tau = dare_weighting(offset, densities, keys, weights, rescale, src.device)
    return merge_blocks(src, weighted_tau, weights, lam, normalize, elect, out_dtype, majority)


__all__ = [
    "BLOCK",
    "Election",
    "SelectOps",
    "TORCH_SELECT",
    "band_counts",
    "dare",
    "dare_drop",
    "dare_source",
    "disjoint_merge",
    "election_balance",
    "magnitude_thresholds",
    "magnitude_thresholds_source",
    "merge_blocks",
    "spans",
    "task_arithmetic",
    "task_vectors",
    "ties_apply",
    "ties_source",
    "weighted_sum",
]
