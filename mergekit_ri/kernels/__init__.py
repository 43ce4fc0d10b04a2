"""Merge kernels: the hot loops of the element-wise methods.

`blocked` holds the plain-torch implementations (the reference, and the fallback everywhere: it
walks tensors in cache-sized blocks so the half-dozen passes per entry hit L2, not DRAM); `rng`
the counter-based random numbers DARE draws, identical on every device; `native` fused C kernels
for the CPU (compiled on first use) and `fused` fused Triton kernels for CUDA, each a single pass
with the maths of `blocked`, against which the tests hold them bit for bit (Triton under
TRITON_INTERPRET=1 on CPU). The functions below pick one; RI_MERGE_KERNELS=torch forces torch.

The backends are imported by the functions that use them, not with this package: the method
modules import it to say which kernel they call, and `ri-merge methods`, `validate` and
`--dry-run` load the method modules without torch (see `mergekit_ri.lazy`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..hugepages import advise_huge_pages
from ..lazy import torch
from .source import Source, TensorSource

FusedMerge = Callable[..., tuple["torch.Tensor", int, "torch.Tensor", "torch.Tensor"]]


def _backend(src: Source, out_dtype: torch.dtype) -> tuple[FusedMerge, Callable[..., bool]] | None:
    """The fused single-pass kernel for this source's device and output dtype, if there is one,
    with the test a chunk's inputs must pass for it."""
    from . import fused, native

    if fused.enabled(src.device):
        return fused.fused_merge, lambda base, experts: True
    if src.device.type == "cpu" and out_dtype in native.DTYPES and native.library() is not None:
        return native.merge, lambda base, experts: native.usable(base.device, base, experts)
    return None


def task_arithmetic(
    base: torch.Tensor,
    experts: torch.Tensor,
    weights: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """θ0 + λ Σ w_i τ_i (/ Σ w_i): the C kernel on CPU where it runs, else torch."""
    from . import blocked, native

    if native.usable(base.device, base, experts, out_dtype=out_dtype):
        return native.task_arithmetic(base, experts, weights, lam, normalize, out_dtype)
    return blocked.task_arithmetic(base, experts, weights, lam, normalize, out_dtype)


def weighted_sum(
    experts: torch.Tensor, weights: list[float], normalize: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """Σ w_i θ_i (/ Σ w_i): the C kernel on CPU where it runs, else torch."""
    from . import blocked, native

    if native.usable(experts.device, experts, out_dtype=out_dtype):
        return native.weighted_sum(experts, weights, normalize, out_dtype)
    return blocked.weighted_sum(experts, weights, normalize, out_dtype)


def magnitude_thresholds_source(src: Source, densities: list[float]) -> list[float]:
    """Each expert's exact k-th largest |τ_i|: counting pass and selections in C on CPU where that
    runs (chunk by chunk: a chunk of dtypes C does not know is counted by torch)."""
    from . import blocked, native

    if src.device.type != "cpu" or native.library() is None:
        return blocked.magnitude_thresholds_source(src, densities)

    def band(base: torch.Tensor, experts: torch.Tensor, lo: list[float], hi: list[float], limit: int):
        if native.usable(base.device, base, experts):
            return native.band(base, experts, lo, hi, limit)
        return blocked.band_counts(base, experts, lo, hi, limit)

    return blocked.magnitude_thresholds_source(
        src, densities, blocked.SelectOps(band, native.kth_largest, magnitude_histograms)
    )


def magnitude_histograms(
    base: torch.Tensor, experts: torch.Tensor, buckets: list[int | None] | None
) -> torch.Tensor:
    """`select.magnitude_histograms`: in C on CPU where that runs, else torch."""
    from . import native, select

    if native.usable(base.device, base, experts):
        return native.histograms(base, experts, buckets)
    return select.magnitude_histograms(base, experts, buckets)


def ties(
    src: Source,
    thresholds: list[float],
    weights: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype,
    majority: int | None = None,
) -> torch.Tensor:
    """TIES with known thresholds: a fused kernel chunk by chunk where one runs, else torch.
    `majority`: the whole tensor's election balance when `src` is a block of its rows."""
    from . import blocked

    kwargs = _ties_kwargs(thresholds, weights, lam, normalize, out_dtype)
    out = _fused_chunks(src, majority=majority, **kwargs)
    if out is not None:
        return out
    return blocked.ties_source(src, thresholds, weights, lam, normalize, out_dtype, majority)


def ties_balance(
    src: Source,
    thresholds: list[float],
    weights: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype,
) -> int:
    """TIES's election balance over a whole tensor (`blocked.election_balance`), merging nothing
    it keeps: then its rows can be merged block by block with `ties(..., majority=balance)`."""
    from . import blocked

    balance = _fused_balance(src, **_ties_kwargs(thresholds, weights, lam, normalize, out_dtype))
    if balance is not None:
        return balance
    return blocked.election_balance(src, blocked.ties_weighting(thresholds, weights, src.device))


def _ties_kwargs(
    thresholds: list[float], weights: list[float], lam: float, normalize: bool, out_dtype: torch.dtype
) -> dict:
    from . import fused

    return dict(
        mode=fused.MODE_TIES,
        elect=True,
        weights=weights,
        lam=lam,
        normalize=normalize,
        out_dtype=out_dtype,
        thresholds=thresholds,
    )


def dare(
    src: Source,
    offset: int,
    densities: list[float],
    keys: list[tuple[int, int]],
    weights: list[float],
    lam: float,
    normalize: bool,
    rescale: bool,
    elect: bool,
    out_dtype: torch.dtype,
    majority: int | None = None,
) -> torch.Tensor:
    """DARE (then sum or TIES election): a fused kernel where one runs, else torch. `majority`:
    the whole tensor's election balance when `src` is a block of its rows."""
    from . import blocked

    kwargs = _dare_kwargs(offset, densities, keys, weights, lam, normalize, rescale, elect, out_dtype)
    out = _fused_chunks(src, majority=majority, **kwargs)
    if out is not None:
        return out
    return blocked.dare_source(
        src, offset, densities, keys, weights, lam, normalize, rescale, elect, out_dtype, majority
    )


def dare_balance(
    src: Source,
    offset: int,
    densities: list[float],
    keys: list[tuple[int, int]],
    weights: list[float],
    lam: float,
    normalize: bool,
    rescale: bool,
    out_dtype: torch.dtype,
) -> int:
    """DARE-TIES's election balance over a whole tensor, as `ties_balance`."""
    from . import blocked

    kwargs = _dare_kwargs(offset, densities, keys, weights, lam, normalize, rescale, True, out_dtype)
    balance = _fused_balance(src, **kwargs)
    if balance is not None:
        return balance
    weighted_tau = blocked.dare_weighting(offset, densities, keys, weights, rescale, src.device)
    return blocked.election_balance(src, weighted_tau)


def _dare_kwargs(
    offset: int,
    densities: list[float],
    keys: list[tuple[int, int]],
    weights: list[float],
    lam: float,
    normalize: bool,
    rescale: bool,
    elect: bool,
    out_dtype: torch.dtype,
) -> dict:
    from . import fused

    return dict(
        mode=fused.MODE_DARE,
        elect=elect,
        weights=weights,
        lam=lam,
        normalize=normalize,
        out_dtype=out_dtype,
        keys=keys,
        densities=densities,
        rescale=rescale,
        offset=offset,
    )


def _fused_chunks(src: Source, majority: int | None = None, **kwargs) -> torch.Tensor | None:
    """The fused kernel over each chunk, or None where there is none for these inputs.

    TIES's zero-sum rule needs the tensor's majority sign, known once every chunk is merged: the
    kernels list the entries they merged with +1, with their merge with −1 beside, which goes in
    their place if the majority turns out negative (`Election`'s rule, without a re-read); a
    block of rows is given the whole tensor's balance as `majority`."""
    backend = _backend(src, kwargs["out_dtype"])
    if backend is None:
        return None
    kernel, supports = backend
    out = torch.empty(src.numel, dtype=kwargs["out_dtype"], device=src.device)
    if out.device.type == "cpu":
        advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    balance, undecided, minus = 0, [], []
    offset = kwargs.pop("offset", 0)
    for first, base, experts in src.chunks():  # (TIES ignores the offset: it draws nothing)
        if not supports(base, experts):
            return None
        _, chunk_balance, where, chunk_minus = kernel(
            base, experts, **kwargs, offset=offset + first, out=out[first : first + base.shape[0]]
        )
        balance += chunk_balance
        undecided.append(where + first)
        minus.append(chunk_minus)
    decided = balance if majority is None else majority
    if kwargs["elect"] and decided < 0 and undecided:
        out[torch.cat(undecided)] = torch.cat(minus).to(out.dtype)
    return out


def _fused_balance(src: Source, **kwargs) -> int | None:
    """The fused kernel's election balance over each chunk, its merge written into one scratch
    chunk and dropped; None where there is no fused kernel for these inputs."""
    backend = _backend(src, kwargs["out_dtype"])
    if backend is None:
        return None
    kernel, supports = backend
    scratch: torch.Tensor | None = None
    balance = 0
    offset = kwargs.pop("offset", 0)
    for first, base, experts in src.chunks():
        if not supports(base, experts):
            return None
        if scratch is None or scratch.numel() < base.shape[0]:
            scratch = torch.empty(base.shape[0], dtype=kwargs["out_dtype"], device=src.device)
        _, chunk_balance, _, _ = kernel(
            base, experts, **kwargs, offset=offset + first, out=scratch[: base.shape[0]]
        )
        balance += chunk_balance
    return balance


__all__ = [
    "Source",
    "TensorSource",
    "dare",
    "magnitude_histograms",
    "magnitude_thresholds_source",
    "task_arithmetic",
    "ties",
    "ties_balance",
    "dare_balance",
    "weighted_sum",
]
