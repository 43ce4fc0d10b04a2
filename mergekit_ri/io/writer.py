"""Sharded safetensors output with every byte offset planned up front.

Each shard file gets its final header and size when it is created; each merged tensor is then
written straight to its place with a positioned write, in any order and from any thread. No
output shard is ever held in memory. The writer knows the layout as plain values (`ShardLayout`,
`TensorSlot`: names, dtypes, shapes, offsets), never the merge plan that produced it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..lazy import torch
from .filehash import WriteHashes


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor goes: bytes [offset, offset + nbytes) of its shard's data section."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ShardLayout:
    """One output shard file: its name, the size of its data section, its tensors in file order."""

    filename: str
    data_bytes: int
    tensors: tuple[TensorSlot, ...]


def shard_header(slots: tuple[TensorSlot, ...] | list[TensorSlot]) -> bytes:
    """The safetensors header of one shard, padded with spaces to an 8-byte boundary."""
    header: dict = {"__metadata__": {"format": "pt", "producer": "ri-merge"}}
    for slot in slots:
        header[slot.name] = {
            "dtype": slot.dtype,
            "shape": list(slot.shape),
            "data_offsets": [slot.offset, slot.offset + slot.nbytes],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def shard_headers(layouts: list[ShardLayout]) -> list[bytes]:
    """Each shard file's first bytes: the 8-byte header length, then the header."""
    return [struct.pack("<Q", len(h)) + h for h in (shard_header(s.tensors) for s in layouts)]


def shard_is_whole(path: Path, head: bytes, data_bytes: int) -> bool:
    """An existing shard file with the planned header and size (a resumed merge keeps it)."""
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size == len(head) + data_bytes and f.read(len(head)) == head
    except OSError:
        return False


Written = Callable[[str, int, memoryview], None]  # tensor name, file position, the bytes written


class ShardWriter:
    """Pre-sized shard files in `folder`; `write(name, tensor)` puts bytes at the planned offset.

    `reuse`: keep shard files that already have the planned header and size (a resumed merge);
    `create=False`: open the files another process created (a distributed merge's worker), never
    create or truncate one. `on_write` sees every write, e.g. to hash work units as they finish.
    `hash_files`: `hashes` keeps each shard file's sha256 as it is written (`io.filehash`), holding
    at most `hash_limit` bytes of early writes (default `filehash.PENDING_LIMIT`)."""

    def __init__(
        self,
        folder: Path,
        layouts: list[ShardLayout],
        *,
        reuse: bool = False,
        create: bool = True,
        on_write: Written | None = None,
        hash_files: bool = False,
        hash_limit: int | None = None,
    ) -> None:
        self._fds: list[int] = []
        heads = shard_headers(layouts)
        self.hashes: WriteHashes | None = None
        if hash_files and create:
            sizes = [len(head) + s.data_bytes for s, head in zip(layouts, heads)]
            self.hashes = WriteHashes([(folder / s.filename, n) for s, n in zip(layouts, sizes)], hash_limit)
        self._data_start: list[int] = []
        self._on_write = on_write
        self._slots = {t.name: (i, t) for i, s in enumerate(layouts) for t in s.tensors}
        for index, (shard, head) in enumerate(zip(layouts, heads)):
            path = folder / shard.filename
            self._data_start.append(len(head))
            if self.hashes is not None:  # a kept file has this very header (shard_is_whole)
                self.hashes.update(index, 0, head)
            if not create:
                self._fds.append(os.open(path, os.O_WRONLY))
                continue
            if reuse and shard_is_whole(path, head, shard.data_bytes):
                self._fds.append(os.open(path, os.O_WRONLY))
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.write(fd, head)
            os.ftruncate(fd, len(head) + shard.data_bytes)

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Put the whole tensor `name`, or rows [r0, r1) of it, at the planned offset."""
        shard, slot = self._slots[name]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        position = self._data_start[shard] + slot.offset
        expected = slot.nbytes
        if rows is not None:
            row_bytes = slot.nbytes // slot.shape[0]
            position += rows[0] * row_bytes
            expected = (rows[1] - rows[0]) * row_bytes
        if data.nbytes != expected:
            raise AssertionError(f"{name}: {data.nbytes} bytes computed, {expected} planned")
        view, done = memoryview(data), 0
        while done < data.nbytes:
            done += os.pwrite(self._fds[shard], view[done:], position + done)
        if self.hashes is not None:
            self.hashes.update(shard, position, view)
        if self._on_write is not None:
            self._on_write(name, position, view)

    def kept(self, shard: int, start: int, end: int) -> None:
        """Bytes [start, end) of a shard file are there already (a resumed merge's finished unit)."""
        if self.hashes is not None:
            self.hashes.on_disk(shard, start, end)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_index(folder: Path, layouts: list[ShardLayout]) -> None:
    """model.safetensors.index.json: every tensor's shard, names sorted."""
    where = {t.name: s.filename for s in layouts for t in s.tensors}
    index = {
        "metadata": {"total_size": sum(t.nbytes for s in layouts for t in s.tensors)},
        "weight_map": {name: where[name] for name in sorted(where)},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
