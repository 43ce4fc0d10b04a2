"""`-v`: each solved layer's WUDI loss before → after, checked against the paper's loss computed
here from the checkpoints (test_wudi's references), through the CLI and per solver."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_cli
from helpers import (
    adam_loop,
    load_family,
    momentum_loop,
    paper_loss,
    paper_weights,
    params,
    problem,
    random_taus,
    ref_aswudi,
)

from mergekit_ri.methods import spectral as S
from mergekit_ri.methods import wudi as W
from mergekit_ri.methods.layers import is_matrix, is_projection
from mergekit_ri.methods.registry import TensorContext, TensorParams

LINE = re.compile(r"^\s+(\S+)\s+loss (\S+) → (\S+) \((\S+)× the start\)\s+(\d+) directions$")


def taus_of(base, experts, name):
    return torch.stack([e[name] - base[name] for e in experts])


def merge_json(tmp_path, recipe, *flags):
    result = run_cli("merge", recipe, "-o", tmp_path / "out", "--json", *flags)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


# ---- the figures each solver reports ----------------------------------------------------------


@pytest.mark.parametrize("solver", W.SOLVERS)
@pytest.mark.parametrize("shape", [(6, 5), (4, 7)])
def test_reported_losses_are_the_paper_loss_at_the_start_and_the_result(solver, shape):
    taus = random_taus(3, *shape, seed=4)
    weights = paper_weights(taus)
    prob = problem(taus)
    stats = {}
    merged = W.solve(
        prob, params(solver=solver, lr=1e-2 if solver.startswith("sgd") else 1e-3, t=20.0), stats
    )
    assert stats["loss_before"] == pytest.approx(float(paper_loss(taus.sum(0), taus, weights)), rel=1e-10)
    assert stats["loss_after"] == pytest.approx(float(paper_loss(merged, taus, weights)), rel=1e-9)
    assert stats["loss_after"] < stats["loss_before"]
    if solver not in W.ITERATIVE:  # how many eigenvectors of G the filter touched
        gram = sum(w * t.T @ t for t, w in zip(taus, weights))
        spec = W.spectrum(gram, torch.float64)
        expected = int(
            (W.closed_form_filter(solver, spec, params(solver=solver, lr=1e-2, t=20.0)) != 0).sum()
        )
        assert stats["directions"] == expected and 0 < expected <= shape[1]


def test_closed_form_loss_change_needs_no_product_and_is_exact_for_any_filter():
    """L(M0 + C Vᵀ) − L(M0) from the coefficients alone, for arbitrary f (including f > 1 and
    f > 2, where the loss goes up), against the paper's loss of the filtered matrix."""
    taus = random_taus(3, 5, 6, seed=7)
    weights = paper_weights(taus)
    prob = problem(
        taus, init=torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    spec = W.spectrum(prob.gram, torch.float64)
    for f in ([0, 0, 0.3, 1, 1.5, 2.5], [0, 0.2, 0, 0, 1, 0]):
        stats = {}
        merged = W.apply_filter(prob, spec, torch.tensor(f, dtype=torch.float64), stats)
        change = float(paper_loss(merged, taus, weights) - paper_loss(prob.init, taus, weights))
        assert stats["loss_change"] == pytest.approx(change, rel=1e-9)
        assert stats["directions"] == sum(v != 0 for v in f)


def test_nothing_is_computed_or_reported_without_a_callback(monkeypatch):
    calls = []
    monkeypatch.setattr(W, "loss", lambda *a: calls.append(a) or 0.0)
    taus = random_taus(3, 6, 5)
    base = torch.zeros(6, 5, dtype=torch.float64)
    W.wudi(base, taus.clone(), params(), TensorContext("model.layers.0.mlp.up_proj.weight"))
    assert calls == []


def test_spectral_methods_report_the_directions_they_keep():
    seen = {}

    def ctx(name):
        return TensorContext(name, report=lambda n, figures: seen.setdefault(n, figures))

    p = TensorParams({}, {"alpha": 1.0, "common_space_fraction": 0.8})
    base, experts = torch.zeros(9, 8), torch.randn(3, 9, 8)
    S.tsv(base, experts.clone(), p, ctx("tsv.q_proj.weight"))
    S.iso_c(base, experts.clone(), p, ctx("iso_c.q_proj.weight"))
    S.iso_cts(base, experts.clone(), p, ctx("iso_cts.q_proj.weight"))
    S.tsv(torch.zeros(8), torch.randn(3, 8), p, ctx("norm.weight"))  # 1-D: the mean, not reported
    S.tsv(base, experts.clone(), p, ctx("model.embed_tokens.weight"))  # embedding: the mean, not reported
    assert seen == {
        "tsv.q_proj.weight": {"directions": 6.0},  # 3 tasks × ⌊8/3⌋
        "iso_c.q_proj.weight": {"directions": 8.0},  # all of Σ τ_i's
        "iso_cts.q_proj.weight": {"directions": 8.0},
    }  # 5 common + 3 × 1


# ---- through the CLI ----------------------------------------------------------------------------


def test_verbose_prints_each_projection_with_its_loss_before_and_after(tmp_path, recipe_for, family):
    result = run_cli("merge", recipe_for("wudi", out_dtype="float32"), "-o", tmp_path / "out", "-v")
    assert result.code == 0, result.stderr
    base, experts = load_family(family)
    lines = {m[1]: m for m in map(LINE.match, result.stderr.splitlines()) if m}
    projections = {name for name in base if is_projection(name, base[name])}
    assert set(lines) == projections and len(projections) == 21  # 7 per decoder layer, nothing else
    for name, m in lines.items():
        before, after, ratio = float(m[2]), float(m[3]), float(m[4])
        taus = taus_of(base, experts, name)
        weights = paper_weights(taus)
        assert before == pytest.approx(float(paper_loss(taus.sum(0), taus, weights)), rel=1e-4), name
        assert after == pytest.approx(
            float(paper_loss(ref_aswudi(taus.sum(0), taus, weights), taus, weights)), rel=1e-3
        ), name
        assert after <= before and ratio == pytest.approx(after / before, abs=1e-3)
    quiet = run_cli("merge", recipe_for("wudi"), "-o", tmp_path / "quiet", "-q", "-v")
    assert quiet.code == 0 and not any(map(LINE.match, quiet.stderr.splitlines()))


@pytest.mark.parametrize(
    "method, parameters",
    [
        ("wudi", {}),
        pytest.param(
            "wudi",
            {"solver": "adam", "iterations": 15, "lr": 1e-4, "scope": "all_2d"},
            marks=pytest.mark.slow,
        ),
        pytest.param("wudi2", {"iterations": 30, "lr": 1e-2}, marks=pytest.mark.slow),
    ],
)
def test_json_verbose_lists_every_solved_layer_with_the_reference_losses(
    tmp_path, recipe_for, family, method, parameters
):
    summary = merge_json(tmp_path, recipe_for(method, out_dtype="float32", parameters=parameters), "-v")
    base, experts = load_family(family)
    solved = is_matrix if parameters.get("scope") == "all_2d" else is_projection
    assert set(summary["layers"]) == {name for name in base if solved(name, base[name])}
    for name, figures in summary["layers"].items():
        taus = taus_of(base, experts, name)
        weights = paper_weights(taus)
        if method == "wudi2":  # the loss of the rank-⌊min(m,n)/N⌋ truncations, from the mean
            rank = min(taus.shape[1:]) // taus.shape[0]
            svds = [torch.linalg.svd(t, full_matrices=False) for t in taus]
            taus_in_loss = [u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] for u, s, vh in svds]
            start = taus.mean(0)
            result = momentum_loop(start, taus_in_loss, weights, 30, 1e-2, 0.9)
        elif parameters.get("solver") == "adam":
            taus_in_loss, start = taus, taus.sum(0)
            result = adam_loop(start, taus, weights, 15, 1e-4)
        else:
            taus_in_loss, start = taus, taus.sum(0)
            result = ref_aswudi(start, taus, weights)
        assert figures["loss_before"] == pytest.approx(
            float(paper_loss(start, taus_in_loss, weights)), rel=1e-4
        ), name
        assert figures["loss_after"] == pytest.approx(
            float(paper_loss(result, taus_in_loss, weights)), rel=2e-3
        ), name
        assert figures["loss_after"] <= figures["loss_before"], name
    assert "layers" not in merge_json(tmp_path / "plain", recipe_for(method, parameters=parameters))


def test_json_verbose_for_a_method_that_reports_nothing(tmp_path, recipe_for):
    summary = merge_json(tmp_path, recipe_for("ties"), "-v")
    assert summary["layers"] == {}
