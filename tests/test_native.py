"""The fused C kernels (kernels/native.c) against the torch kernels they must equal bit for bit,
their selection and band primitives against sorts, their build cache and their fallbacks."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import read_checkpoint, run_cli
from helpers import awkward_inputs, cancelling_inputs, ref_threshold

from mergekit_ri import kernels
from mergekit_ri.kernels import blocked, native
from mergekit_ri.kernels.parallel import single_threaded_ops
from mergekit_ri.kernels.rng import rng_key

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no C kernels here: {native.failure()}")


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, and equal bit patterns wherever non-zero (the sign of a zero may differ)."""
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected), f"{(got != expected).sum()} entries differ"
    nonzero = expected != 0
    assert torch.equal(bits(got)[nonzero], bits(expected)[nonzero])


def inputs(n: int, count: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random base and experts with some all-zero task vectors and exact cancellations."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    experts = (base.float() + 0.01 * torch.randn(count, n, generator=g)).to(dtype)
    experts[0, : n // 10] = base[: n // 10]
    if count > 1 and n > 50:
        experts[1, 5:50] = (2 * base[5:50].float() - experts[0, 5:50].float()).to(dtype)
    return base, experts


CASES = [  # 70,001 entries (the sampled-band threshold path, ~2 s each) in the full suite only
    pytest.param(*case, marks=pytest.mark.slow) if case[0] == 70_001 else case
    for case in itertools.product(
        [7, 1029, 70_001], [1, 2, 3], [torch.bfloat16, torch.float16, torch.float32]
    )
]


@pytest.mark.parametrize("n,count,dtype", CASES)
def test_native_kernels_equal_the_torch_kernels_bit_for_bit(n, count, dtype):
    base, experts = inputs(n, count, dtype, seed=n + count)
    src = kernels.TensorSource(base, experts)
    densities = [0.2, 0.5, 1.0][:count]
    keys = [rng_key(7, "w", i) for i in range(count)]
    thresholds = blocked.magnitude_thresholds(base, experts, densities)
    with single_threaded_ops(2):
        for out_dtype, unit, lam, normalize in itertools.product(
            [torch.bfloat16, torch.float32, torch.float16], [True, False], [1.0, 0.37], [False, True]
        ):
            weights = [1.0] * count if unit else [0.3 + 0.5 * i for i in range(count)]
            assert_same(
                native.task_arithmetic(base, experts, weights, lam, normalize, out_dtype),
                blocked.task_arithmetic(base, experts, weights, lam, normalize, out_dtype),
            )
            assert_same(
                native.weighted_sum(experts, weights, normalize, out_dtype),
                blocked.weighted_sum(experts, weights, normalize, out_dtype),
            )
            assert_same(
                kernels.ties(src, thresholds, weights, lam, normalize, out_dtype),
                blocked.ties_apply(base, experts, thresholds, weights, lam, normalize, out_dtype),
            )
            for elect in (False, True):
                args = (densities, keys, weights, lam, normalize, True, elect, out_dtype)
                assert_same(kernels.dare(src, 11, *args), blocked.dare(base, experts, 11, *args))
    assert experts.dtype == dtype and torch.equal(
        inputs(n, count, dtype, seed=n + count)[1], experts
    )  # untouched


@pytest.mark.parametrize("normalize", [True, False])
def test_native_ties_redoes_undecided_entries_with_the_negative_majority(normalize):
    base, experts = cancelling_inputs(70_001)
    src = kernels.TensorSource(base, experts)
    thresholds = blocked.magnitude_thresholds(base, experts, [1.0] * 3)
    _, balance, undecided, _ = native.merge(
        base,
        experts,
        mode=native.MODE_TIES,
        elect=True,
        weights=[1.0, 1.0, 2.0],
        lam=0.7,
        normalize=normalize,
        out_dtype=torch.float32,
        thresholds=thresholds,
    )
    assert balance < 0 and undecided.numel() > 1000  # the case this test is about
    assert_same(
        kernels.ties(src, thresholds, [1.0, 1.0, 2.0], 0.7, normalize, torch.float32),
        blocked.ties_apply(base, experts, thresholds, [1.0, 1.0, 2.0], 0.7, normalize),
    )


def test_native_merge_lists_every_undecided_entry_past_its_first_buffer(monkeypatch):
    monkeypatch.setattr(native, "UNDECIDED", 4)
    base, experts = cancelling_inputs(5000)
    tau = experts - base
    total = tau.sum(0)
    expected = ((total == 0) & (tau != 0).any(0)).nonzero().reshape(-1)
    _, _, undecided, _ = native.merge(
        base,
        experts,
        mode=native.MODE_TIES,
        elect=True,
        weights=[1.0] * 3,
        lam=1.0,
        normalize=True,
        out_dtype=torch.float32,
        thresholds=[0.0] * 3,
    )
    assert torch.equal(undecided, expected)


@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "zeros", "sparse"])
@pytest.mark.parametrize("n", [999, 70_001, 300_007])
def test_native_thresholds_equal_a_sort(kind, n):
    base, experts = awkward_inputs(kind, n)
    densities = [0.2, 0.01, 0.9]
    tau = experts.float() - base.float()
    with single_threaded_ops(2):
        got = kernels.magnitude_thresholds_source(kernels.TensorSource(base, experts), densities)
    assert got == [ref_threshold(tau[i], d) for i, d in enumerate(densities)]


def test_native_threshold_fallback_when_the_sample_misses(monkeypatch):
    base, experts = awkward_inputs("normal", 200_003)
    monkeypatch.setattr(blocked, "SAMPLE", 16)
    tau = experts.float() - base.float()
    for density in (0.2, 0.001, 0.999):
        got = kernels.magnitude_thresholds_source(kernels.TensorSource(base, experts), [density] * 3)
        assert got == [ref_threshold(t, density) for t in tau]


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(100_003).abs(),
        (torch.randint(0, 5, (70_001,)) * 0.25).float(),
        torch.zeros(9),
        torch.tensor([3.0]),
        torch.tensor([0.0, float("inf"), 1.0, 1e-40]),
        torch.rand(5000) * 1e-30,
    ],
)
def test_native_kth_largest_equals_kthvalue(values):
    for k in sorted({1, min(2, values.numel()), values.numel() // 3 + 1, values.numel()}):
        before = values.clone()
        assert native.kth_largest(values, k) == float(values.kthvalue(values.numel() - k + 1).values)
        assert torch.equal(values, before)


def test_native_band_counts_like_torch():
    base, experts = awkward_inputs("ties", 300_007)
    lo, hi = [0.005, 0.01, float("inf")], [0.015, 0.02, float("inf")]
    with single_threaded_ops(2):
        above, bands = native.band(base, experts, lo, hi, limit=10**6)
        ref_above, ref_bands = blocked.band_counts(base, experts, lo, hi, limit=10**6)
        assert above == ref_above
        for got, expected in zip(bands, ref_bands):
            assert torch.equal(got.sort().values, expected.sort().values)
        assert native.band(base, experts, lo, hi, limit=10)[1][:2] == [None, None]  # too wide: fall back


def test_library_is_built_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    assert native.library() is not None
    built = list((tmp_path / "mergekit-ri" / "native").glob("native-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_library", None)
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp


@pytest.mark.slow  # compiles the C library
def test_a_read_only_cache_still_builds_into_a_temporary_folder(tmp_path, monkeypatch):
    blocked_cache = tmp_path / "file-not-folder"
    blocked_cache.write_text("")  # the cache folder cannot be created under a file
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked_cache))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    assert native.library() is not None, native.failure()
    base, experts = inputs(1000, 2, torch.bfloat16)
    assert_same(
        native.task_arithmetic(base, experts, [1.0, 1.0], 0.5, False, torch.bfloat16),
        blocked.task_arithmetic(base, experts, [1.0, 1.0], 0.5, False, torch.bfloat16),
    )


@pytest.mark.slow  # compiles the C library
def test_a_compiler_without_march_native_builds_portably(tmp_path, monkeypatch):
    import shutil

    fake = tmp_path / "cc"
    fake.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && '
        '{ echo "unknown option -march=native" >&2; exit 1; }; done\n'
        f'exec {shutil.which("cc") or shutil.which("gcc")} "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    assert native.library() is not None, native.failure()
    assert len(list((tmp_path / "cache").rglob("native-*.so"))) == 1


def test_without_a_compiler_the_torch_kernels_run(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    assert native.library() is None and "no-such-compiler" in native.failure()
    base, experts = inputs(5000, 3, torch.bfloat16)
    thresholds = blocked.magnitude_thresholds(base, experts, [0.2] * 3)
    assert kernels.magnitude_thresholds_source(kernels.TensorSource(base, experts), [0.2] * 3) == thresholds
    assert_same(
        kernels.ties(kernels.TensorSource(base, experts), thresholds, [1.0] * 3, 1.0, True, torch.bfloat16),
        blocked.ties_apply(base, experts, thresholds, [1.0] * 3, 1.0, True, torch.bfloat16),
    )


def test_environment_switch_forces_torch(monkeypatch):
    monkeypatch.setenv("RI_MERGE_KERNELS", "torch")
    assert native.library() is None
    assert not native.usable(torch.device("cpu"), torch.zeros(3))


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    "method",
    [
        "task_arithmetic",
        pytest.param("ties", marks=pytest.mark.slow),  # 50-entry row chunks: ~10 s
        "dare_ties",
        "dare_linear",
        "linear",
    ],
)
def test_cli_merges_with_and_without_the_c_kernels_are_identical(
    tmp_path, recipe_for, monkeypatch, method, streamed
):
    """Real merges through the CLI, on the C kernels and with RI_MERGE_KERNELS=torch; `streamed`
    reads tensors by row chunks and takes the sampled-band threshold path even on tiny tensors."""
    import mergekit_ri.reading as reading

    if streamed:
        monkeypatch.setattr(reading, "CHUNK_ELEMENTS", 50)
        monkeypatch.setattr(blocked, "SMALL", 64)
        monkeypatch.setattr(blocked, "SAMPLE", 40)
    parameters = {"linear": {}, "task_arithmetic": {"lambda": 0.8}}.get(
        method, {"density": 0.3, "lambda": 0.8}
    )
    recipe = recipe_for(method, parameters=parameters)
    assert run_cli("merge", recipe, "-o", tmp_path / "native", "--quiet").code == 0
    monkeypatch.setenv("RI_MERGE_KERNELS", "torch")
    assert run_cli("merge", recipe, "-o", tmp_path / "torch", "--quiet").code == 0
    native_out, torch_out = read_checkpoint(tmp_path / "native"), read_checkpoint(tmp_path / "torch")
    assert native_out.keys() == torch_out.keys()
    for name in native_out:
        assert_same(native_out[name], torch_out[name])


def test_verbose_merge_names_the_cpu_kernels(tmp_path, recipe_for, monkeypatch):
    recipe = recipe_for("ties")
    result = run_cli("merge", recipe, "-o", tmp_path / "a", "-v")
    assert result.code == 0 and "CPU kernels: C (" in result.stderr
    monkeypatch.setenv("RI_MERGE_KERNELS", "torch")
    result = run_cli("merge", recipe, "-o", tmp_path / "b", "-v")
    assert result.code == 0 and "CPU kernels: torch (RI_MERGE_KERNELS=torch)" in result.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_histograms_equal_torch(dtype):
    from mergekit_ri.kernels import select

    base, experts = awkward_inputs("heavy", 100_003)
    base, experts = base.to(dtype), experts.to(dtype)
    with single_threaded_ops(2):
        high = native.histograms(base, experts, None)
        assert torch.equal(high, select.magnitude_histograms(base, experts, None))
        assert int(high.sum()) == 3 * 100_003
        buckets = [int(high[0].argmax()), None, int(high[2].nonzero()[-1])]
        low = native.histograms(base, experts, buckets)
        assert torch.equal(low, select.magnitude_histograms(base, experts, buckets))
        assert int(low[1].sum()) == 0 and int(low[0].sum()) == int(high[0].max())


def test_native_kernels_take_empty_tensors():
    base, experts = torch.zeros(0, dtype=torch.bfloat16), torch.zeros(3, 0, dtype=torch.bfloat16)
    src = kernels.TensorSource(base, experts)
    assert native.task_arithmetic(base, experts, [1.0] * 3, 1.0, False, torch.bfloat16).numel() == 0
    assert native.weighted_sum(experts, [1.0] * 3, True, torch.bfloat16).numel() == 0
    assert kernels.magnitude_thresholds_source(src, [0.2] * 3) == [float("inf")] * 3
    assert kernels.ties(src, [1.0] * 3, [1.0] * 3, 1.0, True, torch.bfloat16).numel() == 0
    assert (
        kernels.dare(
            src, 0, [0.5] * 3, [(1, 2)] * 3, [1.0] * 3, 1.0, True, True, True, torch.bfloat16
        ).numel()
        == 0
    )
    assert int(native.histograms(base, experts, None).sum()) == 0
    above, bands = native.band(base, experts, [0.1] * 3, [0.2] * 3, 10)
    assert above == [0, 0, 0] and all(b.numel() == 0 for b in bands)
