"""Byte sizes as people write them ('5B', '500M', '2GiB'), in the two conventions users bring.

Shard and unit sizes follow mergekit's `parse_kmb`, so its recipes and command lines mean what
they meant there: one letter k, m or b (or g) for 10^3, 10^6 and 10^9 ('5B' is five billion
bytes). Memory caps follow `free -g` and docker: K, M, G, T are binary and B is a byte. Both take
the explicit KB/MB/GB (decimal) and KiB/MiB/GiB (binary) spellings, which mean the same in each.
"""

from __future__ import annotations

import math
import re

_EXPLICIT = {
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
SHARD_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, **_EXPLICIT}
MEMORY_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, **_EXPLICIT}

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+|[0-9]+\.)\s*([a-zA-Z]*)\s*")


def read_size(text: str, units: dict[str, int]) -> int | None:
    """Bytes from `text` with one of `units` (case-insensitive); None when it is not a size."""
    match = _SIZE.fullmatch(text)
    if not match or match.group(2).lower() not in units or not math.isfinite(float(match.group(1))):
        return None
    return int(float(match.group(1)) * units[match.group(2).lower()])
