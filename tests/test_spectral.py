"""TSV-M, Iso-C and Iso-CTS against transcriptions of the papers' steps written here (in the
layout of the authors' code: zero-padded singular blocks), and whole merges through the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import read_any, read_checkpoint, run_cli

from mergekit_ri.methods.layers import is_matrix
from mergekit_ri.methods.spectral import common_space_size, iso_c_merge, iso_cts_merge, tsv_merge

NAMES = ["a", "b", "c"]


# ---- references, step by step ---------------------------------------------------------------


def orthogonalise(x):
    """Step "orthogonalise by the polar factor": svd(X) = P Σ Qᵀ → P Qᵀ."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def ref_tsv(taus):
    """TSV-M: SVD each τ_i; place its top r = ⌊k/N⌋ triplets in slot i of zero-padded U, S, V
    (k = min(m, n)); orthogonalise U and V; τ_m = U⊥ diag(S) V⊥ᵀ."""
    n_tasks, k = len(taus), min(taus[0].shape)
    r = k // n_tasks
    if r == 0:
        return sum(taus) / n_tasks
    sum_u = torch.zeros(taus[0].shape[0], k, dtype=taus[0].dtype)
    sum_s = torch.zeros(k, dtype=taus[0].dtype)
    sum_v = torch.zeros(k, taus[0].shape[1], dtype=taus[0].dtype)
    for i, t in enumerate(taus):
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        sum_u[:, i * r : (i + 1) * r] = u[:, :r]
        sum_s[i * r : (i + 1) * r] = s[:r]
        sum_v[i * r : (i + 1) * r] = vh[:r]
    return orthogonalise(sum_u) @ torch.diag(sum_s) @ orthogonalise(sum_v)  # padding: zero singular values


def ref_iso_c(taus):
    """Iso-C: U S Vᵀ = svd(Σ τ_i); τ_m = U (mean(S) I) Vᵀ."""
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh


def ref_iso_cts(taus, fraction=0.8):
    """Iso-CTS: common subspace = top k_c singular directions of Σ τ_i (k_c adjusted so the rest
    divides by N); each task's residual τ_i − U_c U_cᵀ τ_i gives its top (k − k_c)/N directions;
    concatenate, orthogonalise, flat spectrum at the mean of all the singular values."""
    n_tasks, k = len(taus), min(taus[0].shape)
    k_c = int(k * fraction)
    k_c = k - round((k - k_c) / n_tasks) * n_tasks
    per_task = (k - k_c) // n_tasks
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [u[:, :k_c]], [s[:k_c]], [vh[:k_c]]
    for t in taus:
        residual = t - u[:, :k_c] @ u[:, :k_c].T @ t
        ut, st, vt = torch.linalg.svd(residual, full_matrices=False)
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vs.append(vt[:per_task])
    flat = torch.cat(ss).mean()
    return (
        orthogonalise(torch.cat(us, 1))
        @ (flat * torch.eye(k, dtype=u.dtype))
        @ orthogonalise(torch.cat(vs, 0))
    )


def random_taus(n, out, inp, seed=0):
    return torch.randn(n, out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- the maths ------------------------------------------------------------------------------

SHAPES = [(3, 9, 6), (3, 6, 9), (4, 8, 8), (2, 10, 7), (7, 4, 5)]  # last one: more tasks than dimensions


@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_matches_the_papers_steps(shape):
    taus = random_taus(*shape)
    torch.testing.assert_close(tsv_merge(taus.clone()), ref_tsv(list(taus)))


@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_matches_the_papers_steps(shape):
    taus = random_taus(*shape)
    merged = iso_c_merge(taus.clone())
    torch.testing.assert_close(merged, ref_iso_c(list(taus)))
    s = torch.linalg.svdvals(merged)
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())))  # isotropic spectrum


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_matches_the_papers_steps(shape, fraction):
    taus = random_taus(*shape)
    torch.testing.assert_close(iso_cts_merge(taus.clone(), fraction), ref_iso_cts(list(taus), fraction))


def test_common_space_split_follows_the_reference_rounding():
    assert common_space_size(8, 3, 0.8) == (5, 1)  # ⌊6.4⌋ = 6, remainder 2 → round(2/3)·3 = 3
    assert common_space_size(16, 8, 0.8) == (16, 0)  # round(4/8) = 0 (half to even)
    assert common_space_size(768, 8, 0.8) == (616, 19)


def test_tsv_is_lossless_for_orthogonal_low_rank_tasks():
    """Tasks in mutually orthogonal singular subspaces, rank ≤ ⌊k/N⌋: TSV-M returns Σ τ_i."""
    q_out, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    taus = torch.stack(
        [
            q_out[:, 2 * i : 2 * i + 2]
            @ torch.diag(torch.rand(2, dtype=torch.float64) + 0.5)
            @ q_in[:, 2 * i : 2 * i + 2].T
            for i in range(4)
        ]
    )
    torch.testing.assert_close(tsv_merge(taus.clone()), taus.sum(0))


# ---- through the CLI ------------------------------------------------------------------------


def merge_and_load(tmp_path, recipe_for, family, method, **parameters):
    result = run_cli(
        "merge", recipe_for(method, out_dtype="float32", parameters=parameters), "-o", tmp_path / "out", "-q"
    )
    assert result.code == 0, result.stderr
    base = {k: v.double() for k, v in read_any(family["base"]).items()}
    experts = [{k: v.double() for k, v in read_any(family[n]).items()} for n in NAMES]
    return read_checkpoint(tmp_path / "out"), base, experts


@pytest.mark.parametrize(
    "method, reference, parameters",
    [
        ("tsv", ref_tsv, {"alpha": 0.7}),
        ("iso_c", ref_iso_c, {}),
        ("iso_cts", lambda taus: ref_iso_cts(taus, 0.5), {"common_space_fraction": 0.5, "alpha": 1.3}),
    ],
)
def test_merge_through_cli_matches_reference_per_tensor(
    tmp_path, recipe_for, family, method, reference, parameters
):
    merged, base, experts = merge_and_load(tmp_path, recipe_for, family, method, **parameters)
    alpha = parameters.get("alpha", 1.0)
    decomposed = 0
    for name, tensor in merged.items():
        taus = [e[name] - base[name] for e in experts]
        if is_matrix(name, base[name]):
            expected, decomposed = base[name] + alpha * reference(taus), decomposed + 1
        else:  # embeddings, lm_head, norms: the mean of the task vectors
            expected = base[name] + alpha * sum(taus) / len(taus)
        torch.testing.assert_close(
            tensor.double(), expected, rtol=1e-4, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert decomposed == 21 and not is_matrix("model.embed_tokens.weight", base["model.embed_tokens.weight"])
