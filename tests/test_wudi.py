"""WUDI and OptMerge against references written here from the formulas (methods.md): the loss
and gradient by autograd through the paper's loss, the optimisers as plain loops, gradient
descent against the gradient-flow closed form, and whole merges through the CLI."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import read_checkpoint, run_cli
from helpers import (  # noqa: F401
    NAMES,
    adam_loop,
    autograd_gradient,
    gram_and_cross,
    load_family,
    momentum_loop,
    paper_loss,
    paper_weights,
    params,
    problem,
    random_taus,
    ref_aswudi,
)

from mergekit_ri.methods import wudi as W
from mergekit_ri.methods.layers import is_matrix, is_projection

# ---- references, straight from the formulas -------------------------------------------------


# ---- the maths ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 5), (4, 7)])  # both ways of accumulating B (out > in, out <= in)
def test_loss_and_gradient_match_autograd_on_the_paper_loss(shape):
    taus = random_taus(3, *shape)
    weights = paper_weights(taus)
    prob = problem(taus)
    assert torch.allclose(prob.gram.trace(), torch.tensor(3.0, dtype=torch.float64))
    for seed in range(3):
        merged = torch.randn(shape, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
        assert W.loss(prob, merged) == pytest.approx(float(paper_loss(merged, taus, weights)), rel=1e-10)
        torch.testing.assert_close(W.gradient(prob, merged), autograd_gradient(merged, taus, weights))


def test_zero_task_vector_carries_no_weight():
    taus = random_taus(3, 5, 4)
    taus[1] = 0
    assert W.task_weights(taus)[1] == 0
    prob = problem(taus)
    merged = torch.randn(5, 4, dtype=torch.float64)
    keep = [0, 2]
    assert W.loss(prob, merged) == pytest.approx(
        float(paper_loss(merged, taus[keep], paper_weights(taus[keep])))
    )


def test_adam_solver_equals_a_plain_adam_loop_and_lowers_the_loss():
    taus = random_taus(3, 6, 5)
    weights = paper_weights(taus)
    prob = problem(taus)
    ours = W.solve_adam(prob, iterations=40, lr=1e-2)
    torch.testing.assert_close(ours, adam_loop(taus.sum(0), taus, weights, 40, 1e-2), rtol=1e-9, atol=1e-12)
    losses = [W.loss(prob, W.solve_adam(prob, iterations=k, lr=1e-3)) for k in range(0, 60, 5)]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_sgd_solvers_equal_a_plain_momentum_loop():
    taus = random_taus(3, 6, 5)
    prob = problem(taus)
    expected = momentum_loop(taus.sum(0), taus, paper_weights(taus), 60, 2e-2, 0.9)
    torch.testing.assert_close(W.solve_sgd(prob, 60, 2e-2, 0.9), expected)
    spectral = W.solve(prob, params(solver="sgd_spectral", iterations=60, lr=2e-2, momentum=0.9))
    torch.testing.assert_close(spectral, expected, rtol=1e-9, atol=1e-12)
    assert (expected - taus.sum(0)).abs().max() > 0.1  # it moved: the comparison means something


def test_exact_closed_form_is_stationary_and_lowest():
    taus = random_taus(3, 6, 5)
    prob = problem(taus)
    exact = W.solve(prob, params(solver="exact"))
    assert W.gradient(prob, exact).abs().max() < 1e-10 * W.gradient(prob, prob.init).abs().max()
    start = W.loss(prob, prob.init)
    for solver in ("aswudi", "swudi", "flow", "adam", "sgd_spectral"):
        value = W.loss(prob, W.solve(prob, params(solver=solver)))
        assert W.loss(prob, exact) <= value + 1e-9 and value < start, solver


def test_gradient_flow_closed_form_equals_landweber_iteration():
    """Gradient descent on L/2 with step η, t/η times, tends to the flow filter at time t, with an
    O(η) error: halving η halves it. The flow of L (not L/2) for the same time is another point."""
    taus = random_taus(3, 6, 5)
    weights = paper_weights(taus)
    time = 4.0
    flow = W.solve(problem(taus), params(solver="flow", t=time))
    moved = (flow - taus.sum(0)).norm()
    assert moved > 1.0

    def landweber(step):
        m = taus.sum(0)
        for _ in range(round(time / step)):
            m = m - step * sum(w * (m - t) @ t.T @ t for t, w in zip(taus, weights))  # ∇(L/2)
        return m

    coarse, fine = ((landweber(step) - flow).norm() / moved for step in (2e-3, 1e-3))
    assert fine < 1e-3 and 0.4 < fine / coarse < 0.6, (coarse, fine)
    on_full_loss = W.solve(problem(taus), params(solver="flow", t=2 * time))
    assert (on_full_loss - flow).norm() / moved > 100 * fine


def test_closed_forms_keep_the_init_outside_the_solved_directions():
    """OptMerge's set-up: rank-1 task vectors span 2 of 6 input directions, and the init (a
    full-rank mean) must keep its other 4 directions; SWUDI keeps every discarded eigenvector."""
    low = random_taus(2, 5, 6, rank=1)
    init = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    prob = problem(low, init)
    _, _, vh = torch.linalg.svd(low.reshape(-1, 6))
    null = vh[2:].T  # input directions no task vector touches
    for solver in ("aswudi", "swudi", "flow", "exact", "sgd", "sgd_spectral"):
        merged = W.solve(prob, params(solver=solver, lr=1e-2))
        torch.testing.assert_close(merged @ null, init @ null, msg=solver)
        assert not torch.allclose(merged, init), solver
    taus = random_taus(3, 6, 8)
    prob = problem(taus)
    _, vec = torch.linalg.eigh(prob.gram)
    k = math.ceil(0.5 * 8)
    swudi = W.solve(prob, params(solver="swudi", rank_ratio=0.5, t=50.0))
    torch.testing.assert_close(swudi @ vec[:, :-k], prob.init @ vec[:, :-k])


def test_aswudi_rank_and_stationarity_on_its_subspace():
    taus = random_taus(3, 6, 9)
    prob = problem(taus)
    lam, vec = torch.linalg.eigh(prob.gram)
    k = W.participation_rank(lam)
    assert 1 <= k < 9 and k == math.ceil(lam.clamp(min=0).sqrt().sum() ** 2 / lam.clamp(min=0).sum() - 1e-9)
    merged = W.solve(prob, params(solver="aswudi"))
    assert (W.gradient(prob, merged) @ vec[:, -k:]).abs().max() < 1e-10
    torch.testing.assert_close(merged, ref_aswudi(prob.init, taus, paper_weights(taus)))
    # k equal eigenvalues: exactly k, not k + 1 from rounding
    assert W.participation_rank(torch.tensor([0.0, 0.0, 0.3, 0.3, 0.3], dtype=torch.float64)) == 3


def test_float32_eigh_matches_float64_on_a_well_conditioned_layer():
    taus = random_taus(4, 12, 10).float()
    prob = problem(taus)
    a = W.solve(prob, params(solver="aswudi", eigh_dtype="float32"))
    b = W.solve(prob, params(solver="aswudi", eigh_dtype="float64"))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- through the CLI ------------------------------------------------------------------------


def merge(tmp_path, recipe):
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "-q")
    assert result.code == 0, result.stderr
    return read_checkpoint(tmp_path / "out")


def check_per_tensor(merged, base, experts, solved, reference, rest):
    """Each tensor against the test-side reference: `reference(taus)` where `solved(name)`."""
    for name, tensor in merged.items():
        taus = torch.stack([e[name] - base[name] for e in experts])
        expected = base[name] + (reference(taus) if solved(name, base[name]) else rest(taus, base[name]))
        torch.testing.assert_close(
            tensor.double(), expected, rtol=1e-4, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_wudi_default_merge_through_cli(tmp_path, recipe_for, family):
    merged = merge(tmp_path, recipe_for("wudi", out_dtype="float32"))
    base, experts = load_family(family)
    check_per_tensor(
        merged,
        base,
        experts,
        is_projection,
        lambda taus: ref_aswudi(taus.sum(0), taus, paper_weights(taus)),
        lambda taus, b: torch.zeros_like(b),
    )  # scope linear: the rest is the base
    assert not torch.equal(
        merged["model.layers.0.mlp.down_proj.weight"].double(), base["model.layers.0.mlp.down_proj.weight"]
    )


@pytest.mark.slow
def test_wudi_adam_all_2d_through_cli(tmp_path, recipe_for, family):
    recipe = recipe_for(
        "wudi",
        out_dtype="float32",
        parameters={"solver": "adam", "iterations": 15, "lr": 1e-4, "scope": "all_2d", "lambda": 0.5},
    )
    merged = merge(tmp_path, recipe)
    base, experts = load_family(family)
    check_per_tensor(
        merged,
        base,
        experts,
        is_matrix,
        lambda taus: 0.5 * adam_loop(taus.sum(0), taus, paper_weights(taus), 15, 1e-4),
        lambda taus, b: 0.5 * taus.mean(0),
    )  # embeddings, lm_head, norms: mean of τ_i


@pytest.mark.slow
def test_wudi2_merge_through_cli_equals_optmerge_sgd_loop(tmp_path, recipe_for, family):
    # the default solver (sgd_spectral) with fewer, larger steps than OptMerge's 300 x 1e-4,
    # so that the reference loop stays fast and the merge moves visibly from the mean
    merged = merge(
        tmp_path, recipe_for("wudi2", out_dtype="float32", parameters={"iterations": 30, "lr": 1e-2})
    )
    base, experts = load_family(family)

    def optmerge(taus):
        rank = min(taus.shape[1:]) // taus.shape[0]
        truncated = []
        for t in taus:
            u, s, vh = torch.linalg.svd(t, full_matrices=False)
            truncated.append(u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank])
        return momentum_loop(taus.mean(0), truncated, paper_weights(taus), 30, 1e-2, 0.9)

    check_per_tensor(merged, base, experts, is_projection, optmerge, lambda taus, b: torch.zeros_like(b))
    name = "model.layers.1.self_attn.o_proj.weight"
    mean = base[name] + torch.stack([e[name] - base[name] for e in experts]).mean(0)
    assert (merged[name].double() - mean).abs().max() > 1e-4
