"""`mergekit_ri.methods.reference` against hand-computed examples of the papers' formulas, and
every fast backend (torch `blocked`, the C kernels, the Triton kernels under TRITON_INTERPRET=1)
against the reference, on awkward data: bf16 task vectors with many magnitudes tied at the
threshold, exact zero sums under a negative and a positive majority, all-zero stretches, odd
sizes, weights other than 1, λ, normalize.

Equality is exact (the same fp32 values, rounded once to the output dtype) wherever a backend
does the reference's operations in the reference's order. Where it does not, the test says why
and allows a couple of fp32 ulps of the result: far below what any change of rule moves (a
trimmed, dropped or wrongly signed entry moves a result by ~|τ| = 0.01, thousands of ulps), which
`test_each_rule_is_visible_in_the_data` checks.
"""

from __future__ import annotations

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything else does

import itertools

import pytest
from helpers import Chunked

from mergekit_ri import kernels
from mergekit_ri.kernels import blocked, native
from mergekit_ri.kernels.parallel import single_threaded_ops
from mergekit_ri.kernels.rng import keep_mask, rng_key
from mergekit_ri.kernels.source import TensorSource
from mergekit_ri.methods import TensorContext, TensorParams, get_method
from mergekit_ri.methods import reference as ref

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---- awkward inputs -------------------------------------------------------------------------------


def awkward(
    n: int, count: int = 3, negative: bool = True, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base [n] and experts [count, n] in `dtype` whose task vectors take few distinct magnitudes
    (many ties at any threshold), cancel exactly in ~30% of the entries (τ_0 = −τ_1, τ_2 = 0),
    vanish on a stretch, and sum to mostly negative (or positive) totals elsewhere, so that the
    zero-sum entries take a negative (or positive) majority sign."""
    g = torch.Generator().manual_seed(seed + n)
    base = torch.randn(n, generator=g).to(dtype).float()
    step = torch.randint(1, 4, (n,), generator=g).float() / 64  # exact in bf16 steps of base ~1
    lean = -1.0 if negative else 1.0
    tau = torch.stack(
        [step * torch.randint(-2, 3, (n,), generator=g).float() + lean * step for _ in range(count)]
    )
    if count >= 2:
        cancel = torch.rand(n, generator=g) < 0.3
        tau[1][cancel] = -tau[0][cancel]
        tau[2:, cancel] = 0.0
    tau[:, : n // 7] = 0.0  # an all-zero stretch
    experts = (base + tau).to(dtype)
    return base.to(dtype), experts


def zero_sums(base: torch.Tensor, experts: torch.Tensor, weights: list[float]) -> int:
    """Entries whose weighted task vectors sum to exactly 0 with some of them non-zero."""
    weighted = ref.per_expert(weights, experts) * ref.task_vectors(base, experts)
    return int(((ref.rows_total(weighted) == 0) & (weighted != 0).any(0)).sum())


def ulps(x: torch.Tensor) -> torch.Tensor:
    """The spacing of fp32 at |x|."""
    a = x.abs().float()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


def assert_exact(got: torch.Tensor, expected_fp32: torch.Tensor, what: str) -> None:
    """`got` equals the reference rounded once to got's dtype (the sign of a zero aside)."""
    expected = expected_fp32.to(got.dtype)
    differ = int((got != expected).sum())
    assert differ == 0, f"{what}: {differ} of {got.numel()} entries differ from the reference"


def assert_near(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor, what: str) -> None:
    """fp32 `got` within 2 ulps of the result plus 2 of the base: the room left by θ0 + λ·τ_m
    computed with two roundings instead of one, or λ/Σw folded into one scalar."""
    assert got.dtype == torch.float32
    room = 2 * (ulps(expected) + ulps(base.float()))
    worst = float(((got - expected).abs() - room).max()) if got.numel() else 0.0
    assert worst <= 0, f"{what}: off the reference by more than 2 ulps"


# ---- the reference against the papers' formulas, on numbers worked out by hand ---------------------


def test_linear_and_task_arithmetic_by_hand():
    experts = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert ref.linear(experts, [1.0, 3.0]).tolist() == [2.5, 3.5]  # (1·1 + 3·3)/4, (1·2 + 3·4)/4
    assert ref.linear(experts, [1.0, 3.0], normalize=False).tolist() == [10.0, 14.0]
    base = torch.tensor([1.0, 1.0])
    # τ = [[0, 1], [2, 3]]: 1 + 0.5·(1·τ_0 + 3·τ_1) = [1 + 0.5·6, 1 + 0.5·10]
    assert ref.task_arithmetic(base, experts, [1.0, 3.0], lam=0.5).tolist() == [4.0, 6.0]
    assert ref.task_arithmetic(base, experts, [1.0, 3.0], lam=0.5, normalize=True).tolist() == [1.75, 2.25]


TIES_BASE = torch.ones(6)
TIES_TAUS = torch.tensor(
    [[4.0, -2.0, 2.0, 1.0, 0.0, -3.0], [-1.0, 2.0, -2.0, -3.0, 1.0, -1.0], [2.0, 1.0, -5.0, 1.0, 1.0, -2.0]]
)


def test_ties_by_hand_keeps_ties_at_the_threshold_and_gives_zero_sums_the_majority_sign():
    experts = TIES_BASE + TIES_TAUS
    # density 0.5, n = 6: k = 3; the 3rd largest |τ_i| is 2 for each, and every |τ| = 2 is kept
    assert [ref.magnitude_threshold(t, 0.5) for t in TIES_TAUS] == [2.0, 2.0, 2.0]
    assert ref.trim(TIES_TAUS[0], 2.0).tolist() == [4.0, -2.0, 2.0, 0.0, 0.0, -3.0]  # 4 kept of k = 3
    # trimmed sums [6, 0, -5, -3, 0, -5]: γ = [+, 0, −, −, 0, −], Σγ = −2 so the zero sums take −1
    merged = ref.ties(TIES_BASE, experts, [1.0] * 3, [0.5] * 3)
    # agreeing means: (4+2)/2, −2/1 (entry 1 elected −1 by the majority), (−2−5)/2, −3/1, 0, (−3−2)/2
    assert (merged - 1).tolist() == [3.0, -2.0, -3.5, -3.0, 0.0, -2.5]
    # weights [1, 2, 1]: sums [6, 2, −9, −6, 0, −5]; means over the agreeing weights; λ = 0.5
    merged = ref.ties(TIES_BASE, experts, [1.0, 2.0, 1.0], [0.5] * 3, lam=0.5)
    assert ((merged - 1) / 0.5).tolist() == [3.0, 2.0, -3.0, -3.0, 0.0, -2.5]  # 6/2, 4/2, −9/3, −6/2, 0, −5/2
    merged = ref.ties(TIES_BASE, experts, [1.0, 2.0, 1.0], [0.5] * 3, normalize=False)
    assert (merged - 1).tolist() == [6.0, 4.0, -9.0, -6.0, 0.0, -5.0]


def test_ties_zero_sum_takes_plus_one_when_the_majority_is_not_negative():
    tau = torch.tensor([[1.0, 3.0, -1.0], [-1.0, 0.0, 0.0]])  # sums [0, 3, −1]: Σγ = 0 → +1
    merged = ref.ties(torch.zeros(3), tau, [1.0, 1.0], [1.0, 1.0])
    assert merged.tolist() == [1.0, 3.0, -1.0]


def test_model_thresholds_by_hand():
    bases = [torch.zeros(2), torch.zeros(3)]
    experts = [torch.tensor([[5.0, 1.0], [0.5, 0.5]]), torch.tensor([[2.0, -3.0, 4.0], [0.1, 0.2, 0.3]])]
    # expert 0 over the model: |τ| = 5, 1, 2, 3, 4; density 0.4 → k = 2 → 4 (per tensor: 5 and 3)
    assert ref.model_thresholds(bases, experts, [0.4, 1.0])[0] == 4.0
    assert ref.model_thresholds(bases, experts, [0.4, 1.0])[1] == 0.0  # k = n: all kept
    assert ref.model_thresholds(bases, experts, [0.0, 0.1]) == [float("inf")] * 2  # k = 0: none kept


def test_dare_by_hand_with_a_pinned_mask():
    key = rng_key(7, "w", 0)
    mask = keep_mask(0, 8, 0.5, key)
    # the generator's draws for these 8 entries (pinned: a change of generator changes merges)
    assert mask.tolist() == PINNED_MASK
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])
    expected = [v * 2.0 if kept else 0.0 for v, kept in zip(tau.tolist(), PINNED_MASK)]  # m ⊙ τ / 0.5
    assert ref.dare_drop(tau, 0.5, key).tolist() == expected
    assert ref.dare_drop(tau, 0.5, key, rescale=False).tolist() == [v / 2 for v in expected]
    assert ref.dare_drop(tau, 1.0, key).tolist() == tau.tolist()
    assert ref.dare_drop(tau, 0.0, key).abs().sum() == 0
    # dare_linear of two copies: θ0 + λ(w_0 τ̃_0 + w_1 τ̃_1), each with its own key
    keys = [key, rng_key(7, "w", 1)]
    other = ref.dare_drop(tau, 0.5, keys[1])
    merged = ref.dare_linear(torch.zeros(8), torch.stack([tau, tau]), [1.0, 0.5], [0.5, 0.5], keys, lam=2.0)
    assert merged.tolist() == [2.0 * (a + 0.5 * b) for a, b in zip(expected, other.tolist())]


PINNED_MASK = [False, True, True, True, True, True, False, False]


# ---- every backend against the reference ------------------------------------------------------------

SIZES = [1, 7, 1029, 9001]  # with blocks of 1000 entries: several, and a ragged last one
SETTINGS = [  # (weights, λ, normalize)
    ([1.0, 1.0, 1.0], 1.0, True),
    ([1.0, 1.0, 1.0], 0.7, False),
    ([0.5, 2.0, 1.25], 0.3, True),
    ([0.5, 2.0, 1.25], 1.5, False),
    ([0.5, -1.0, 1.25], 0.7, True),  # a negative weight flips a sign
]


def ties_cases(n: int):
    for negative, (weights, lam, normalize) in itertools.product([True, False], SETTINGS):
        base, experts = awkward(n, negative=negative)
        yield base, experts, weights, lam, normalize


@pytest.fixture(params=["torch", "C"])
def backend(request, monkeypatch):
    """The kernels' dispatch on the CPU: forced to torch, or the C kernels (skipped where none)."""
    if request.param == "torch":
        monkeypatch.setenv("RI_MERGE_KERNELS", "torch")
    elif native.library() is None:
        pytest.skip(f"no C kernels here: {native.failure()}")
    return request.param


def test_the_awkward_data_has_what_it_is_for():
    base, experts = awkward(70_001, negative=True)
    tau = ref.task_vectors(base, experts)
    assert zero_sums(base, experts, [1.0] * 3) > 10_000
    assert float(torch.sign(ref.rows_total(tau)).sum()) < 0
    threshold = ref.magnitude_threshold(tau[0], 0.2)
    assert int((tau[0].abs() >= threshold).sum()) > int(0.2 * tau.shape[1]) + 1000  # many ties kept
    base, experts = awkward(70_001, negative=False)
    assert float(torch.sign(ref.rows_total(ref.task_vectors(base, experts))).sum()) > 0


# 70,001 > SMALL: the sampled band's path (several seconds with the torch backend)
@pytest.mark.parametrize("n", [*SIZES, pytest.param(70_001, marks=pytest.mark.slow)])
def test_thresholds_equal_the_reference(backend, n):
    """The sampled band + radix select (torch or C) equals a full sort, exactly."""
    for negative, density in itertools.product([True, False], [0.0, 0.01, 0.2, 0.5, 1.0]):
        base, experts = awkward(n, negative=negative)
        tau = ref.task_vectors(base, experts)
        expected = [ref.magnitude_threshold(t, density) for t in tau]
        got = kernels.magnitude_thresholds_source(TensorSource(base, experts), [density] * 3)
        assert got == expected, (negative, density)


@pytest.mark.parametrize("n", SIZES)
def test_ties_equals_the_reference_exactly(backend, monkeypatch, n):
    """Same operations in the same order (trim, weigh, Σ row by row, agree, Σ, divide, one fused
    θ0 + λ·τ_m): the same values, also across blocks, threads and chunks of rows."""
    monkeypatch.setattr(blocked, "BLOCK", 1000)
    for base, experts, weights, lam, normalize in ties_cases(n):
        densities = [0.2, 0.5, 1.0]
        thresholds = kernels.magnitude_thresholds_source(TensorSource(base, experts), densities)
        expected = ref.ties(base, experts, weights, densities, lam, normalize)
        for out_dtype, source in itertools.product(OUT_DTYPES, [TensorSource, Chunked]):
            src = TensorSource(base, experts) if source is TensorSource else Chunked(base, experts, 333)
            with single_threaded_ops(2):
                got = kernels.ties(src, thresholds, weights, lam, normalize, out_dtype)
            assert_exact(got, expected, f"ties {backend} n={n} {weights} {lam} {normalize} {out_dtype}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("elect", [False, True])
def test_dare_equals_the_reference_exactly(backend, monkeypatch, n, elect):
    """Drop with the same draws, rescale by the same fp32 1/p, weigh, then the same sum or TIES
    steps: the same values, also for a block of rows at an offset."""
    monkeypatch.setattr(blocked, "BLOCK", 1000)
    keys = [rng_key(3, "t", i) for i in range(3)]
    for i, (base, experts, weights, lam, normalize) in enumerate(ties_cases(n)):
        densities, rescale = [0.3, 1.0, 0.6], i % 3 != 1
        expected = ref.dare(
            base, experts, weights, densities, keys, lam, normalize, rescale, elect, offset=11
        )
        for out_dtype in OUT_DTYPES:
            with single_threaded_ops(2):
                got = kernels.dare(
                    TensorSource(base, experts),
                    11,
                    densities,
                    keys,
                    weights,
                    lam,
                    normalize,
                    rescale,
                    elect,
                    out_dtype,
                )
            assert_exact(got, expected, f"dare {backend} n={n} elect={elect} {weights} {lam} {normalize}")


@pytest.mark.parametrize("n", SIZES)
def test_task_arithmetic_and_linear_equal_the_reference(backend, n):
    """Exact without normalize. With it the kernels multiply by one scalar λ/Σw (linear: 1/Σw)
    where the reference divides by Σw then multiplies by λ: a last-bit difference, fp32 output."""
    for base, experts, weights, lam, normalize in ties_cases(n):
        expected = ref.task_arithmetic(base, experts, weights, lam, normalize)
        soup = ref.linear(experts, weights, normalize)
        for out_dtype in OUT_DTYPES if not normalize else [torch.float32]:
            got = kernels.task_arithmetic(base, experts, weights, lam, normalize, out_dtype)
            got_soup = kernels.weighted_sum(experts, weights, normalize, out_dtype)
            if normalize:
                assert_near(got, expected, base, f"task_arithmetic {backend} n={n}")
                assert_near(got_soup, soup, torch.zeros_like(soup), f"linear {backend} n={n}")
            else:
                assert_exact(got, expected, f"task_arithmetic {backend} n={n} {out_dtype}")
                assert_exact(got_soup, soup, f"linear {backend} n={n} {out_dtype}")


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_the_registered_methods_equal_the_reference(backend, method):
    """What the engine calls: the registered function with resolved parameters and a context
    (the DARE keys from seed, tensor name and expert index; TIES thresholds per tensor, or given
    by a whole-model pre-pass)."""
    base, experts = awkward(4099, negative=True)
    weights, densities = [0.5, 2.0, 1.25], [0.2, 0.5, 0.9]
    spec = get_method(method)
    globals_ = {p.name: p.default for p in spec.params if not p.per_model}
    globals_.update({"lambda": 0.6} if "lambda" in globals_ else {})
    per_model = {"weight": weights, "density": densities}
    params = TensorParams(
        {k: v for k, v in per_model.items() if any(p.name == k for p in spec.params)}, globals_
    )
    normalize = globals_["normalize"]
    keys = [rng_key(5, "model.w", i) for i in range(3)]
    expected = {
        "linear": lambda: ref.linear(experts, weights, normalize),
        "task_arithmetic": lambda: ref.task_arithmetic(base, experts, weights, 0.6, normalize),
        "ties": lambda: ref.ties(base, experts, weights, densities, 0.6, normalize),
        "dare_linear": lambda: ref.dare_linear(base, experts, weights, densities, keys, 0.6, normalize),
        "dare_ties": lambda: ref.dare_ties(base, experts, weights, densities, keys, 0.6, normalize),
    }[method]()
    got = spec.fn(base, experts, params, TensorContext("model.w", seed=5))
    if method == "linear":  # 1/Σw folded into one scalar (see above)
        assert_near(got, expected, torch.zeros_like(expected), method)
    else:
        assert_exact(got, expected, method)


def test_ties_with_model_thresholds_equals_the_reference(backend):
    """`trim_scope: model`: the thresholds of the reference's whole-model sort, given to the
    kernel, merge each tensor like the reference with the same thresholds."""
    tensors = []
    for n, scale in ((999, 4.0), (70_001, 1.0), (7, 0.25)):  # task vectors of different sizes per tensor
        base, experts = awkward(n, negative=n % 2 == 0, seed=n)
        tensors.append((base, (base.float() + scale * (experts.float() - base.float())).bfloat16()))
    thresholds = ref.model_thresholds([b for b, _ in tensors], [e for _, e in tensors], [0.2, 0.3, 0.5])
    per_tensor_differs = False
    for base, experts in tensors:
        expected = ref.ties(base, experts, [1.0] * 3, [0.2, 0.3, 0.5], thresholds=thresholds)
        per_tensor_differs |= not torch.equal(expected, ref.ties(base, experts, [1.0] * 3, [0.2, 0.3, 0.5]))
        got = kernels.ties(TensorSource(base, experts), thresholds, [1.0] * 3, 1.0, True, torch.float32)
        assert_exact(got, expected, f"ties model scope {backend}")
    assert per_tensor_differs


def test_the_ties_prepass_finds_the_reference_model_thresholds(backend):
    """TIES declares its `trim_scope: model` pass through the registry (`MethodSpec.prepass`); given
    the model's tensors in any order and folded in any grouping (as Ray tasks would), it finds the
    thresholds of a whole-model sort."""
    spec = get_method("ties")
    tensors = [awkward(n, negative=n % 2 == 0, seed=n) for n in (999, 70_001, 7)]
    densities = [0.2, 0.03, 1.0]
    params = [TensorParams({"density": densities, "weight": [1.0] * 3}, {"trim_scope": "model"})] * len(
        tensors
    )
    reads = []

    def scan(part, fold):  # tensors in reverse order, folded as two groups then together
        reads.append(1)
        parts = [part(base, experts) for base, experts in reversed(tensors)]
        return fold(parts[0], fold(parts[1], parts[2]))

    assert spec.prepass is not None and spec.prepass.reads(params) == 2
    got = spec.prepass.run(params, scan)
    assert list(got) == ref.model_thresholds([b for b, _ in tensors], [e for _, e in tensors], densities)
    assert len(reads) == 2
    tensor_scope = [TensorParams({"density": densities}, {"trim_scope": "tensor"})]
    assert spec.prepass.reads(tensor_scope) == 0 and get_method("dare_ties").prepass is None


def test_each_rule_is_visible_in_the_data():
    """Each of the rules the reference states moves some result on the data above by far more
    than the tolerance: so a deliberate change to the reference fails the tests."""
    base, experts = awkward(70_001, negative=True)
    weights, densities = [0.5, 2.0, 1.25], [0.2, 0.5, 1.0]
    kept = ref.ties(base, experts, weights, densities, 0.7, True)
    tau = ref.task_vectors(base, experts)
    thresholds = [ref.magnitude_threshold(t, d) for t, d in zip(tau, densities)]
    w = ref.per_expert(weights, tau)

    def ties_with(trimmed: torch.Tensor, gamma_rule=ref.elect_signs) -> torch.Tensor:
        weighted = w * trimmed
        return ref.add_scaled(base, ref.disjoint_mean(weighted, gamma_rule(weighted), weights, True), 0.7)

    def plus_one(weighted: torch.Tensor) -> torch.Tensor:  # mergekit's rule for zero sums
        gamma = torch.sign(ref.rows_total(weighted))
        return torch.where(gamma == 0, 1.0, gamma)

    trimmed = torch.stack([ref.trim(t, th) for t, th in zip(tau, thresholds)])
    strict = torch.stack([torch.where(t.abs() > th, t, 0.0) for t, th in zip(tau, thresholds)])
    assert torch.equal(ties_with(trimmed), kept)
    for mutant in (ties_with(strict), ties_with(trimmed, plus_one)):
        assert float((mutant - kept).abs().max()) > 1e-3
    unnormalized = ref.add_scaled(
        base, ref.disjoint_mean(w * trimmed, ref.elect_signs(w * trimmed), weights, False), 0.7
    )
    assert float((unnormalized - kept).abs().max()) > 1e-3
    flipped = [0.5, -2.0, 1.25]  # agreement by the sign of w_i τ_i, not of τ_i
    signed = ref.per_expert(flipped, tau) * trimmed
    by_unweighted_sign = torch.sign(trimmed) * signed.abs()
    merged = ref.disjoint_mean(signed, ref.elect_signs(signed), flipped, True)
    assert (
        float(
            (ref.disjoint_mean(by_unweighted_sign, ref.elect_signs(signed), flipped, True) - merged)
            .abs()
            .max()
        )
        > 1e-3
    )
    keys = [rng_key(3, "t", i) for i in range(3)]
    drops = ref.dare(base, experts, weights, [0.3] * 3, keys)
    assert (
        float((ref.dare(base, experts, weights, [0.3] * 3, keys, rescale=False) - drops).abs().max()) > 1e-3
    )
    assert float((ref.dare(base, experts, weights, [0.3] * 3, keys, offset=1) - drops).abs().max()) > 1e-3


# ---- the Triton kernels (interpreted on the CPU) -----------------------------------------------------


@pytest.fixture
def fused(monkeypatch):
    """The fused kernels, compiled on a GPU or interpreted on the CPU (TRITON_INTERPRET=1), and
    the dispatch sent to them."""
    pytest.importorskip("triton")
    from mergekit_ri.kernels import fused

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    monkeypatch.setattr(fused, "enabled", lambda device: True)
    return fused


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "n", [1, 7, pytest.param(1029, marks=pytest.mark.slow), pytest.param(2051, marks=pytest.mark.slow)]
)
def test_triton_ties_and_dare_equal_the_reference(fused, n):
    """Within 2 ulps: the kernel computes θ0 + λ·τ_m as a multiply then an add (the interpreter;
    on a GPU the compiler may fuse them), where the reference rounds once. Everything before that
    (the trim, the draws, the signs, the sums, the zero-sum majority) is the reference's."""
    keys = [rng_key(3, "t", i) for i in range(3)]
    for base, experts, weights, lam, normalize in ties_cases(n):
        src = TensorSource(base.to(DEVICE), experts.to(DEVICE))
        densities = [0.2, 0.5, 1.0]
        thresholds = kernels.magnitude_thresholds_source(TensorSource(base, experts), densities)
        got = kernels.ties(src, thresholds, weights, lam, normalize, torch.float32).cpu()
        assert_near(
            got, ref.ties(base, experts, weights, densities, lam, normalize), base, f"triton ties n={n}"
        )
        for elect in (False, True):
            got = kernels.dare(
                src, 11, densities, keys, weights, lam, normalize, True, elect, torch.float32
            ).cpu()
            expected = ref.dare(
                base, experts, weights, densities, keys, lam, normalize, True, elect, offset=11
            )
            assert_near(got, expected, base, f"triton dare n={n} elect={elect}")
