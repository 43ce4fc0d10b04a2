"""TIES and DARE-TIES merged block by block: with the whole tensor's election balance computed
first (`kernels.ties_balance` / `dare_balance`), every block takes the tensor's majority sign
for its zero-sum entries, and the blocks put together are the whole tensor's merge, bit for bit,
on the C kernels and on torch's."""

from __future__ import annotations

import pytest
import torch
from helpers import Chunked, awkward_inputs, cancelling_inputs

from mergekit_ri import kernels
from mergekit_ri.kernels import blocked, native


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("RI_MERGE_KERNELS", "torch")
    elif native.library() is None:
        pytest.skip("no C compiler here")
    return request.param


INPUTS = {
    "negative majority": lambda: tuple(t.bfloat16() for t in cancelling_inputs(5000)),
    "positive majority": lambda: (
        cancelling_inputs(5000)[0].bfloat16(),
        (2 * cancelling_inputs(5000)[0] - cancelling_inputs(5000)[1]).bfloat16(),
    ),
    "tied magnitudes": lambda: awkward_inputs("ties", 4099),
}
SPLITS = [(0, 1), (1, 1000), (1000, 2999), (2999, None)]


def _blocks(merge, base, experts):
    """merge(source) of each block of entries, put together."""
    parts = []
    for start, stop in SPLITS:
        stop = base.numel() if stop is None else stop
        parts.append(merge(kernels.TensorSource(base[start:stop], experts[:, start:stop]), start))
    return torch.cat(parts)


@pytest.mark.parametrize("inputs", INPUTS, ids=list(INPUTS))
def test_ties_blocks_with_the_tensor_balance_are_the_whole_merge(backend, inputs):
    base, experts = INPUTS[inputs]()
    weights, args = [1.0, 1.0, 2.0], (0.9, True, torch.bfloat16)  # a and -a still cancel
    thresholds = blocked.magnitude_thresholds(base, experts, [1.0, 1.0, 0.9])
    whole_source = kernels.TensorSource(base, experts)
    whole = kernels.ties(whole_source, thresholds, weights, *args)
    balance = kernels.ties_balance(whole_source, thresholds, weights, *args)
    tau = blocked.trim(experts.float() - base.float(), thresholds) * torch.tensor(weights).reshape(-1, 1)
    sums = tau.sum(0)
    assert balance == int((sums > 0).sum()) - int((sums < 0).sum())  # the definition
    if inputs == "negative majority":
        assert balance < 0 and bool(((sums == 0) & (tau != 0).any(0)).any())  # the rule is exercised
    parts = _blocks(
        lambda src, at: kernels.ties(src, thresholds, weights, *args, majority=balance), base, experts
    )
    assert torch.equal(parts, whole)
    alone = _blocks(lambda src, at: kernels.ties(src, thresholds, weights, *args), base, experts)
    if inputs == "negative majority":
        assert not torch.equal(alone, whole)  # each block on its own would elect differently


@pytest.mark.parametrize("inputs", ["negative majority", "tied magnitudes"])
def test_dare_ties_blocks_with_the_tensor_balance_are_the_whole_merge(backend, inputs):
    base, experts = INPUTS[inputs]()
    keys = [(7, i) for i in range(3)]
    densities, weights = [0.9, 0.9, 0.9], [1.0, 1.0, 1.0]

    def merge(src, offset, majority=None):
        return kernels.dare(
            src, offset, densities, keys, weights, 1.0, False, True, True, torch.bfloat16, majority=majority
        )

    whole_source = kernels.TensorSource(base, experts)
    whole = merge(whole_source, 0)
    balance = kernels.dare_balance(
        whole_source, 0, densities, keys, weights, 1.0, False, True, torch.bfloat16
    )
    assert torch.equal(_blocks(lambda src, at: merge(src, at, balance), base, experts), whole)


def test_the_balance_is_the_same_on_both_backends(monkeypatch):
    base, experts = INPUTS["negative majority"]()
    thresholds = blocked.magnitude_thresholds(base, experts, [1.0, 1.0, 0.9])
    args = (thresholds, [1.0, 1.0, 2.0], 0.9, True, torch.bfloat16)
    native = kernels.ties_balance(kernels.TensorSource(base, experts), *args)
    monkeypatch.setenv("RI_MERGE_KERNELS", "torch")
    assert kernels.ties_balance(kernels.TensorSource(base, experts), *args) == native


def test_a_band_too_wide_over_many_small_chunks_is_dropped_as_it_grows(monkeypatch):
    """Under a tight cap a tensor comes in many small row chunks: the threshold search's band of
    candidate magnitudes (tied bf16 values fill it) is bounded over all chunks, not per chunk —
    an expert whose band outgrows the limit stops collecting at once and is selected exactly by
    the streamed radix select instead."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200_000, generator=g)
    experts = base + 0.01 * torch.randn(3, 200_000, generator=g)  # fp32: every magnitude distinct
    monkeypatch.setattr(blocked, "BAND_ENTRIES", 3 * 500)  # 500 values an expert: ~15 chunks' worth
    collected: list[list[int]] = []

    def band(b, e, lo, hi, limit):
        above, bands = blocked.band_counts(b, e, lo, hi, limit)
        collected.append([0 if x is None else x.numel() for x in bands])
        return above, bands

    densities = [0.2, 0.5, 0.9]
    ops = blocked.SelectOps(band, blocked.kth_largest)
    got = blocked.magnitude_thresholds_source(Chunked(base, experts, 1000), densities, ops)
    tau = (experts.float() - base.float()).abs()
    assert got == [
        float(tau[i].kthvalue(200_000 - int(d * 200_000) + 1).values) for i, d in enumerate(densities)
    ]
    for i in range(3):
        sizes = [chunk[i] for chunk in collected]
        over = next(n for n in range(len(sizes)) if sum(sizes[: n + 1]) > 500)
        assert over < len(sizes) - 10 and not any(sizes[over + 1 :])  # nothing collected after it overflowed
