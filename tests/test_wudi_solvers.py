"""Which solver runs: each `solver` name reaches its own code, the solvers that should differ do,
`sgd` and `sgd_spectral` agree because they are the same iterate (not because one name falls
through to the other), and `wudi` refuses OptMerge's SGD solvers with the valid choices."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import read_checkpoint, run_cli
from helpers import params, problem, random_taus

from mergekit_ri.methods import get_method
from mergekit_ri.methods import wudi as W

# what each solver must call, and what it must not
SIGNATURES = {
    "aswudi": {"participation_rank", "top_k"},
    "swudi": {"flow_filter", "top_k"},
    "flow": {"flow_filter"},
    "exact": set(),
    "sgd_spectral": {"momentum_residual"},
    "adam": {"Adam"},
    "sgd": {"SGD"},
}
HOOKED = ("participation_rank", "top_k", "flow_filter", "momentum_residual")


@pytest.fixture
def calls(monkeypatch):
    """Records every call of the closed forms' building blocks and of the optimisers' steps."""
    seen: list[str] = []
    for name in HOOKED:
        original = getattr(W, name)
        monkeypatch.setattr(W, name, lambda *a, _n=name, _f=original, **k: seen.append(_n) or _f(*a, **k))
    for optimizer in (torch.optim.Adam, torch.optim.SGD):
        original = optimizer.step
        monkeypatch.setattr(
            optimizer,
            "step",
            lambda self, *a, _n=optimizer.__name__, _f=original, **k: seen.append(_n) or _f(self, *a, **k),
        )
    monkeypatch.setattr(W, "spectrum", lambda *a, _f=W.spectrum: seen.append("eigh") or _f(*a))
    return seen


@pytest.mark.parametrize("solver", W.SOLVERS)
def test_each_solver_name_runs_its_own_code(calls, solver):
    W.solve(problem(random_taus(3, 6, 5)), params(solver=solver, iterations=7, lr=1e-3))
    assert set(calls) - {"eigh"} == SIGNATURES[solver]
    assert ("eigh" in calls) == (solver not in W.ITERATIVE)  # iterative solvers never decompose G
    if solver in W.ITERATIVE:
        assert len(calls) == 7  # one optimiser step per iteration


def test_unknown_solver_is_not_silently_a_closed_form():
    with pytest.raises(ValueError, match="not a closed-form solver: sgd_spectrall"):
        W.solve(problem(random_taus(3, 6, 5)), params(solver="sgd_spectrall"))


def spread_taus(n=4, out=10, inp=24, seed=2):
    """Task vectors whose G has a spread spectrum (1e-4 … 1, as real layers): on a small
    well-conditioned G every filter is 1 everywhere and the closed forms all coincide."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.arange(1, inp + 1, dtype=torch.float64) ** -1.5
    rotations = [
        torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))[0] for _ in range(n)
    ]
    return torch.stack(
        [(torch.randn(out, inp, generator=g, dtype=torch.float64) * decay) @ q for q in rotations]
    )


@pytest.mark.slow  # runs every solver
def test_solvers_differ_except_sgd_and_its_spectral_form():
    """Every pair of solvers gives a different merge at the same parameters, except `sgd` and
    `sgd_spectral`: the same momentum-SGD iterate by two routes, equal to rounding."""
    prob = problem(spread_taus())
    eigenvalues = torch.linalg.eigvalsh(prob.gram)
    assert eigenvalues[0] < 1e-3 and eigenvalues[-1] > 0.5
    merged = {s: W.solve(prob, params(solver=s, iterations=300, lr=1e-3, t=None)) for s in W.SOLVERS}
    scale = prob.init.norm()
    for a, b in itertools.combinations(W.SOLVERS, 2):
        gap = float((merged[a] - merged[b]).norm() / scale)
        if {a, b} == {"sgd", "sgd_spectral"}:
            assert gap < 1e-10, gap
        else:
            assert gap > 0.1, (a, b, gap)


def test_momentum_sgd_is_a_short_gradient_flow():
    """Why `wudi` does not offer `sgd`: per eigenvalue, k momentum-SGD steps remove what the
    gradient flow removes in time t ≈ 2·lr·(k − μ(1 − μᵏ)/(1 − μ))/(1 − μ). At WUDI's lr (1e-5,
    Adam's) that is t ≈ 0.06 against `flow`'s 300: the merge stays at Σ τ_i."""
    values = torch.linspace(0, 1, 21, dtype=torch.float64)
    k, lr, mu = 300, 1e-5, 0.9
    time = 2 * lr * (k - mu * (1 - mu**k) / (1 - mu)) / (1 - mu)
    sgd = 1 - W.momentum_residual(values, k, lr, mu)
    torch.testing.assert_close(sgd, W.flow_filter(values, time), rtol=3e-3, atol=1e-12)
    assert time == pytest.approx(0.0582) and float(sgd.max()) < 0.06
    prob = problem(random_taus(3, 9, 7, seed=5))
    moved = W.solve(prob, params(solver="sgd", lr=lr)) - prob.init
    assert float(moved.norm() / (W.solve(prob, params(solver="flow")) - prob.init).norm()) < 0.05


def test_wudi_offers_its_own_solvers_and_wudi2_optmerges_too():
    wudi, wudi2 = get_method("wudi"), get_method("wudi2")
    assert wudi.param("solver").choices == ("aswudi", "swudi", "flow", "exact", "adam")
    assert wudi2.param("solver").choices == W.SOLVERS
    assert "momentum" not in {p.name for p in wudi.params}  # only SGD used it
    assert wudi2.param("momentum").default == 0.9


@pytest.mark.parametrize(
    "parameters, expected",
    [
        ({"solver": "sgd"}, "parameters.solver: 'sgd' is not one of aswudi, swudi, flow, exact, adam"),
        (
            {"solver": "sgd_spectral"},
            "parameters.solver: 'sgd_spectral' is not one of aswudi, swudi, flow, exact, adam",
        ),
        (
            {"solver": [{"filter": "mlp", "value": "sgd"}, {"value": "flow"}]},
            "parameters.solver: 'sgd' is not one of",
        ),
        ({"momentum": 0.5}, "unknown parameter 'momentum' for merge_method 'wudi'"),
    ],
)
def test_wudi_refuses_optmerge_solvers_naming_the_field_and_the_choices(
    tmp_path, recipe_for, parameters, expected
):
    result = run_cli("merge", recipe_for("wudi", parameters=parameters), "-o", tmp_path / "out")
    assert result.code == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # four wudi2 SGD merges through the CLI
@pytest.mark.parametrize("solver, forbidden", [("sgd", "momentum_residual"), ("sgd_spectral", "solve_sgd")])
def test_wudi2_sgd_routes_through_the_cli_are_separate_and_agree(
    tmp_path, recipe_for, monkeypatch, solver, forbidden
):
    """Through the CLI, `sgd` never touches the spectral residual and `sgd_spectral` never runs
    the SGD loop (each would fail here), and the two merges agree to fp32 rounding."""
    outputs = {}
    for name in ("sgd", "sgd_spectral"):
        recipe = recipe_for(
            "wudi2", out_dtype="float32", parameters={"solver": name, "iterations": 30, "lr": 1e-2}
        )
        with monkeypatch.context() as m:
            if name == solver:
                m.setattr(
                    W,
                    forbidden,
                    lambda *a, _n=name, **k: (_ for _ in ()).throw(AssertionError(f"{_n} ran {forbidden}")),
                )
            result = run_cli("merge", recipe, "-o", tmp_path / name, "-q")
        assert result.code == 0, result.stderr
        outputs[name] = read_checkpoint(tmp_path / name)
    moved = 0
    for tensor_name, tensor in outputs["sgd"].items():
        torch.testing.assert_close(tensor, outputs["sgd_spectral"][tensor_name], rtol=1e-4, atol=1e-6)
        moved += "proj" in tensor_name
    assert moved == 21
