"""Fuzzing the safetensors header reader: whatever the bytes, a header is parsed or refused with
a `UserError` — never another exception, never a read outside the file, never much memory.

Bounded in CI; `RI_MERGE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz_headers.py` for more.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_ri.errors import UserError
from mergekit_ri.io.sources import ST_DTYPES, TensorReader, read_header

EXAMPLES = int(os.environ.get("RI_MERGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

numbers = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.booleans(), st.text(max_size=4), st.none()
)
entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(ST_DTYPES)), st.text(max_size=5), numbers),
        "shape": st.one_of(st.lists(st.one_of(st.integers(-3, 40), numbers), max_size=4), numbers),
        "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-100, 400), numbers), max_size=3), numbers),
    }
)
headers = st.dictionaries(st.text(max_size=8), st.one_of(entry, numbers), max_size=5)


def write(path: Path, header: bytes, data: bytes, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def parse_or_refuse(path: Path) -> None:
    """The property: UserError or a header whose every range lies inside the file and reads."""
    try:
        refs, _ = read_header(path)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    size = path.stat().st_size
    with TensorReader() as reader:
        for ref in refs.values():
            assert 8 <= ref.start <= ref.end <= size
            assert reader.read(ref).numel() == ref.numel


@FUZZ
@given(header=headers, data=st.binary(max_size=512), length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]))
def test_structured_headers(tmp_path_factory, header: dict, data: bytes, length_delta: int) -> None:
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    parse_or_refuse(write(path, raw, data, max(0, len(raw) + length_delta)))


@FUZZ
@given(blob=st.binary(max_size=600))
def test_raw_bytes(tmp_path_factory, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(blob)
    parse_or_refuse(path)


@FUZZ
@given(header=headers, data=st.binary(max_size=256))
def test_bytes_flipped_in_a_valid_file(tmp_path_factory, header: dict, data: bytes) -> None:
    """A real, valid file with one byte of its header changed."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 3, dtype=torch.bfloat16)}, path)
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    at = (len(data) * 7919 + len(header)) % (8 + length)
    raw[at] = (raw[at] + 1 + len(data)) % 256
    path.write_bytes(bytes(raw))
    parse_or_refuse(path)


def test_hostile_header_memory_is_bounded(tmp_path: Path) -> None:
    """A header that declares a huge length or a huge tensor allocates nothing in proportion."""
    huge = json.dumps({"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 2**64]}}).encode()
    cases = [
        write(tmp_path / "len.safetensors", b"{}", b"", length=2**63),
        write(tmp_path / "big.safetensors", huge, b""),
    ]
    tracemalloc.start()
    for path in cases:
        with pytest.raises(UserError):
            read_header(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 * 2**20
