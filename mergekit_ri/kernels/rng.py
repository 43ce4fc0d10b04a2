"""Counter-based random numbers: entry j of a tensor gets a value that depends only on
(key, j), so CPU and GPU, whole tensors and row blocks, all draw the same DARE mask.

The generator is a keyed integer hash (two rounds of Wellons' `lowbias32` mixer) computed with
int64 torch ops holding uint32 values; every product is split so nothing overflows, hence the
result is bit-identical on every backend. The Triton kernels implement the same function with
native uint32 arithmetic (see `triton.py`), and the tests hold them to it.
"""

from __future__ import annotations

import hashlib

from ..lazy import torch

MASK32 = 0xFFFFFFFF
M1, M2 = 0x7FEB352D, 0x846CA68B
UNIFORM_BITS = 24  # the uniform is h >> 8: 24 bits, exactly representable in fp32


def rng_key(seed: int, tensor_name: str, expert_index: int) -> tuple[int, int]:
    """Two 32-bit keys from (seed, tensor, expert): independent of order and device."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{expert_index}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value & MASK32, value >> 32


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2^32 for x < 2^32, without int64 overflow: split the constant in halves."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, M1)
    x = x ^ (x >> 15)
    x = _mul32(x, M2)
    return x ^ (x >> 16)


def hash_counter(index: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """uint32 hash (in int64) of element indices < 2^32 under a 64-bit key."""
    return mix32(mix32(index ^ key[0]) ^ key[1])


def keep_threshold(keep: float) -> int:
    """Entries whose 24-bit uniform is below this are kept: P(keep) = keep to 2^-24."""
    return min(1 << UNIFORM_BITS, max(0, round(keep * (1 << UNIFORM_BITS))))


def keep_mask(
    start: int, count: int, keep: float, key: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bernoulli(keep) mask for flat entries [start, start + count) of a tensor."""
    if start + count > 1 << 32:
        raise ValueError("tensors of more than 2^32 entries are not supported by the DARE generator")
    return keep_mask_at(torch.arange(start, start + count, dtype=torch.int64, device=device), keep, key)


def keep_mask_at(index: torch.Tensor, keep: float, key: tuple[int, int]) -> torch.Tensor:
    """Bernoulli(keep) draws for the given flat entry indices (int64)."""
    return (hash_counter(index, key) >> 8) < keep_threshold(keep)
