"""`methods.geometry`: whole-tensor dot products for the spherical methods and model_stock, against
float64 sums, across chunk and block boundaries, for inputs as read (bf16) and fp32."""

from __future__ import annotations

import pytest
import torch

from mergekit_ri.methods import geometry
from mergekit_ri.methods.geometry import dot64, gram64, norm64


def exact_gram(rows, center=None):
    x = torch.stack([r.double().reshape(-1) for r in rows])
    if center is not None:
        x = x - center.double().reshape(-1)
    return x @ x.T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [5, 1024, 3 * 4096 + 1500 + 3])
def test_gram64_equals_float64_sums_across_chunks(monkeypatch, dtype, n):
    monkeypatch.setattr(geometry, "CHUNK", 4096)  # several chunks, a partial one, a tail of a block
    g = torch.Generator().manual_seed(n)
    base = (1 + torch.randn(n, generator=g)).to(dtype)  # all-positive products: fp32 sums drift
    rows = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
    # fp32 sums over blocks of 256 products (fp32 inputs: each product rounded too)
    rtol = 1e-7
    for center in (None, base):
        got, want = gram64(rows, center), exact_gram(rows, center)
        assert got.dtype == torch.float64 and got.shape == (3, 3)
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    assert rows[0].dtype == dtype and torch.equal(base, base.clone())  # inputs untouched


def test_gram64_is_far_more_exact_than_one_fp32_sum():
    n = 1 << 21
    x = (1 + torch.rand(n, generator=torch.Generator().manual_seed(0))).bfloat16()
    exact = float((x.double() ** 2).sum())
    assert abs(float(gram64([x])[0, 0]) - exact) / exact < 1e-8
    one_sum = float(torch.ones(n).dot((x.float() ** 2)))  # one fp32 accumulation
    assert abs(one_sum - exact) / exact > 1e-7  # what the blocks avoid


def test_dot64_and_norm64():
    a, b = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([1.0, -1.0, 2.0])
    assert dot64(a, b) == -1.0
    assert norm64(a) == 5.0


def test_gram64_does_not_depend_on_the_number_of_workers(monkeypatch):
    from mergekit_ri.kernels.parallel import single_threaded_ops

    monkeypatch.setattr(geometry, "CHUNK", 4096)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(7 * 4096 + 11, generator=g).bfloat16() for _ in range(3)]
    alone = gram64(rows, rows[0])
    for threads in (2, 3):
        with single_threaded_ops(threads):
            assert torch.equal(gram64(rows, rows[0]), alone)
