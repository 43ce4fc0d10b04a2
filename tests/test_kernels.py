"""The merge kernels against references written from the formulas: the counter-based DARE
generator against a numpy uint32 hash, the sampled-band threshold against a sort, the blocked
and block-parallel TIES/DARE against whole-tensor references (including the zero-sum majority
rule), and the fused Triton kernels against the torch kernels under TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import sys

import torch
from helpers import awkward_inputs, cancelling_inputs, ref_threshold  # noqa: F401

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything else does

import numpy as np
import pytest
from helpers import ref_disjoint_merge, ref_trim

import mergekit_ri.kernels.blocked as blocked
from mergekit_ri.kernels.parallel import single_threaded_ops
from mergekit_ri.kernels.rng import M1, M2, keep_mask, keep_mask_at, rng_key

# ---- the DARE generator ------------------------------------------------------------------


def numpy_hash(index: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Wellons' lowbias32, twice, in native uint32 arithmetic (wrapping multiplies)."""

    def mix(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(M1)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(M2)
        return x ^ (x >> np.uint32(16))

    with np.errstate(over="ignore"):
        return mix(mix(index.astype(np.uint32) ^ np.uint32(key[0])) ^ np.uint32(key[1]))


def test_dare_generator_equals_a_uint32_hash_and_does_not_depend_on_blocks():
    key = rng_key(3, "model.layers.0.mlp.up_proj.weight", 1)
    index = np.arange(0, 200_000, dtype=np.int64) * 7919 % (1 << 32)
    expected = (numpy_hash(index, key) >> np.uint32(8)) < np.uint32(round(0.3 * (1 << 24)))
    got = keep_mask_at(torch.from_numpy(index), 0.3, key)
    assert np.array_equal(got.numpy(), expected)
    whole = keep_mask(0, 10_000, 0.3, key)
    pieces = torch.cat([keep_mask(a, b - a, 0.3, key) for a, b in [(0, 17), (17, 4096), (4096, 10_000)]])
    assert torch.equal(whole, pieces)
    big = keep_mask(0, 1_000_000, 0.3, key)
    assert abs(big.float().mean().item() - 0.3) < 0.002
    assert not torch.equal(
        big, keep_mask(0, 1_000_000, 0.3, rng_key(3, "model.layers.0.mlp.up_proj.weight", 2))
    )


# ---- exact thresholds -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "zeros", "sparse"])
@pytest.mark.parametrize("n", [1, 999, 70_001, pytest.param(300_007, marks=pytest.mark.slow)])
def test_magnitude_thresholds_equal_a_sort(kind, n):
    base, experts = awkward_inputs(kind, n)
    densities = [0.2, 0.01, 0.9]
    got = blocked.magnitude_thresholds(base, experts, densities)
    tau = experts.float() - base.float()
    assert got == [ref_threshold(tau[i], d) for i, d in enumerate(densities)]
    assert blocked.magnitude_thresholds(base, experts, [0.0, 1.0, 0.5])[:2] == [float("inf"), 0.0]


def test_threshold_fallback_when_the_sample_misses(monkeypatch):
    base, experts = awkward_inputs("normal", 200_003)
    monkeypatch.setattr(blocked, "SAMPLE", 16)  # a 16-entry sample brackets badly
    tau = experts.float() - base.float()
    for density in (0.2, 0.001, 0.999):
        assert blocked.magnitude_thresholds(base, experts, [density] * 3) == [
            ref_threshold(t, density) for t in tau
        ]


# ---- TIES / DARE by blocks --------------------------------------------------------------------


@pytest.mark.parametrize("block", [64, 1000, 1 << 20])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_by_blocks_follows_the_whole_tensor_majority_rule(monkeypatch, block, normalize):
    base, experts = cancelling_inputs()
    monkeypatch.setattr(blocked, "BLOCK", block)
    weights = [1.0, 0.5, 2.0]
    thresholds = blocked.magnitude_thresholds(base, experts, [1.0] * 3)
    got = blocked.ties_apply(base, experts, thresholds, weights, 0.7, normalize)
    taus = [ref_trim(e - base, 1.0) for e in experts]
    expected = base + 0.7 * ref_disjoint_merge(taus, weights, normalize)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("elect", [False, True])
def test_parallel_blocks_equal_sequential_blocks(monkeypatch, elect):
    base, experts = awkward_inputs("normal", 100_003)
    monkeypatch.setattr(blocked, "BLOCK", 4096)
    keys = [rng_key(1, "t", i) for i in range(3)]
    args = (base, experts, 0, [0.3, 0.5, 1.0], keys, [1.0, 1.0, 0.5], 0.8, False, True, elect)
    sequential = blocked.dare(*args)
    with single_threaded_ops(3):
        parallel = blocked.dare(*args)
    assert torch.equal(sequential, parallel)
    thresholds = blocked.magnitude_thresholds(base, experts, [0.2] * 3)
    with single_threaded_ops(2):
        assert blocked.magnitude_thresholds(base, experts, [0.2] * 3) == thresholds
        ties_parallel = blocked.ties_apply(base, experts, thresholds, [1.0] * 3, 1.0, True)
    assert torch.equal(ties_parallel, blocked.ties_apply(base, experts, thresholds, [1.0] * 3, 1.0, True))


def test_dare_rows_offset_draws_the_same_masks_as_the_whole_tensor():
    base, experts = awkward_inputs("normal", 10_000)
    keys = [rng_key(5, "w", i) for i in range(3)]
    args = ([0.4] * 3, keys, [1.0] * 3, 1.0, False, True, False)
    whole = blocked.dare(base, experts, 0, *args)
    parts = torch.cat(
        [blocked.dare(base[a:b], experts[:, a:b], a, *args) for a, b in [(0, 333), (333, 10_000)]]
    )
    assert torch.equal(whole, parts)


# ---- fused Triton kernels (interpreted on CPU) ------------------------------------------------


@pytest.fixture
def interpreted():
    """The fused kernels, compiled on a GPU or interpreted on the CPU (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from mergekit_ri.kernels import fused

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    return fused


SHAPES = [1, 7, 1023, 1025, pytest.param(4099, marks=pytest.mark.slow)]  # interpreted Triton: slow
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, interpreted here


@pytest.mark.parametrize("n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_ties_equals_the_torch_kernel(interpreted, monkeypatch, n, dtype):
    from mergekit_ri import kernels

    monkeypatch.setattr(interpreted, "enabled", lambda device: True)
    base, experts = awkward_inputs("ties", n)  # magnitudes tied at the threshold, exact cancellations
    base, experts = base.to(dtype), experts.to(dtype)
    experts[:, : n // 3] = base[: n // 3]  # an all-zero stretch of task vectors
    weights = [1.0, 0.5, 2.0]
    thresholds = blocked.magnitude_thresholds(base, experts, [0.3, 0.2, 0.5])
    tau = blocked.trim(experts.float() - base.float(), thresholds) * torch.tensor(weights).reshape(-1, 1)
    total = tau.sum(0)
    undecided_ref = int(((total == 0) & (tau > 0).any(0)).sum())
    for normalize in (True, False):
        expected = blocked.ties_apply(base, experts, thresholds, weights, 0.9, normalize)
        got = kernels.ties(
            kernels.TensorSource(base.to(DEVICE), experts.to(DEVICE)),
            thresholds,
            weights,
            0.9,
            normalize,
            torch.float32,
        ).cpu()
        # same kept entries and signs; only the last rounding of θ0 + λ·τ may differ (FMA or not)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        stored, balance, undecided, _ = interpreted.fused_merge(
            base.to(DEVICE),
            experts.to(DEVICE),
            mode=interpreted.MODE_TIES,
            elect=True,
            weights=weights,
            lam=0.9,
            normalize=normalize,
            out_dtype=torch.bfloat16,
            thresholds=thresholds,
        )
        stored = stored.cpu()
        assert stored.dtype == torch.bfloat16
        assert balance == int(torch.sign(total).sum()) and undecided.numel() == undecided_ref
        assert torch.equal(undecided.cpu(), ((total == 0) & (tau != 0).any(0)).nonzero().reshape(-1))
        if not (undecided.numel() and balance < 0):
            torch.testing.assert_close(stored.float(), got.bfloat16().float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("elect", [False, True])
@pytest.mark.parametrize("n", [5, 1500])
def test_fused_dare_draws_the_same_masks_as_the_torch_kernel(interpreted, monkeypatch, elect, n):
    from mergekit_ri import kernels

    base, experts = awkward_inputs("normal", n)
    keys = [rng_key(9, "x", i) for i in range(3)]
    args = (12345, [0.3, 1.0, 0.6], keys, [1.0, 1.0, 0.5], 0.6, False, True, elect)
    expected = blocked.dare(base, experts, *args)
    monkeypatch.setattr(interpreted, "enabled", lambda device: True)
    got = kernels.dare(kernels.TensorSource(base.to(DEVICE), experts.to(DEVICE)), *args, torch.float32).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    fused, _, _, _ = interpreted.fused_merge(
        base.to(DEVICE),
        experts.to(DEVICE),
        mode=interpreted.MODE_DARE,
        elect=False,
        weights=args[3],
        lam=0.6,
        normalize=False,
        out_dtype=torch.float32,
        keys=keys,
        densities=args[1],
        offset=12345,
    )
    # the kept entries are exactly those of the torch generator: compare the drop pattern itself
    dropped = blocked.dare(base, experts, 12345, args[1], keys, [1.0, 1.0, 0.5], 0.6, False, True, False)
    torch.testing.assert_close(fused.cpu(), dropped, rtol=1e-6, atol=1e-7)


def test_fused_ties_reports_undecided_entries_and_the_dispatch_redoes_them(interpreted, monkeypatch):
    from mergekit_ri import kernels

    monkeypatch.setattr(interpreted, "enabled", lambda device: True)
    base, experts = cancelling_inputs(3000)
    thresholds = [0.0, 0.0, 0.0]
    _, balance, undecided, _ = interpreted.fused_merge(
        base.to(DEVICE),
        experts.to(DEVICE),
        mode=interpreted.MODE_TIES,
        elect=True,
        weights=[1.0] * 3,
        lam=1.0,
        normalize=True,
        out_dtype=torch.float32,
        thresholds=thresholds,
    )
    assert undecided.numel() > 0 and balance < 0
    got = kernels.ties(
        kernels.TensorSource(base.to(DEVICE), experts.to(DEVICE)),
        thresholds,
        [1.0] * 3,
        1.0,
        True,
        torch.float32,
    ).cpu()
    expected = base + ref_disjoint_merge([e - base for e in experts], [1.0] * 3)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_row_source_reads_chunks_samples_and_gathers_like_the_tensors(tmp_path, monkeypatch):
    """The engine's on-demand row reader gives the same entries as the tensors in memory."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import read_any

    import mergekit_ri.reading as engine
    from mergekit_ri.io.sources import TensorReader
    from mergekit_ri.plan import build_plan
    from mergekit_ri.recipe import parse_recipe
    from mergekit_ri.synthetic import LlamaShape, make_family

    folders = make_family(
        tmp_path,
        ["a", "b"],
        shape=LlamaShape(vocab=97, hidden=24, intermediate=40, layers=1, heads=2, kv_heads=1),
        dtype="bfloat16",
        shards=2,
    )
    plan = build_plan(
        parse_recipe(
            {
                "merge_method": "ties",
                "base_model": str(folders["base"]),
                "models": [{"model": str(folders[n])} for n in ("a", "b")],
            }
        )
    )
    task = next(t for t in plan.tasks if t.name == "model.embed_tokens.weight")
    base = read_any(folders["base"])[task.name].reshape(-1)
    experts = torch.stack([read_any(folders[n])[task.name].reshape(-1) for n in ("a", "b")])
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)  # chunks of 4 rows
    with TensorReader() as reader, ThreadPoolExecutor(2) as pool:
        src = engine.RowSource(reader, task, torch.device("cpu"), pool)
        chunks = list(src.chunks())
        assert len(chunks) > 10
        assert torch.equal(torch.cat([b for _, b, _ in chunks]), base)
        assert torch.equal(torch.cat([e for _, _, e in chunks], dim=1), experts)
        sample_base, sample_experts = src.sample(200)
        assert sample_base.numel() >= 200 and sample_experts.shape == (2, sample_base.numel())
        for count in (5, 300):  # a few rows (row by row) and entries all over (a pass of chunks)
            index = torch.randperm(base.numel())[:count]
            got_base, got_experts = src.gather(index)
            assert torch.equal(got_base, base[index].float())
            assert torch.equal(got_experts, experts[:, index].float())
