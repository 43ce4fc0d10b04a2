"""Sharded safetensors output with every byte offset planned up front.

Each shard file gets its final header and size when it is created; each merged tensor is then
written straight to its place with a positioned write, in any order and from any thread. No
output shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from ..plan import MergePlan, TensorTask


def shard_header(tasks: list[TensorTask]) -> bytes:
    """The safetensors header of one shard, padded with spaces to an 8-byte boundary."""
    header: dict = {"__metadata__": {"format": "pt", "producer": "ri-merge"}}
    for task in tasks:
        header[task.name] = {
            "dtype": task.out_dtype,
            "shape": list(task.shape),
            "data_offsets": [task.offset, task.offset + task.out_nbytes],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def shard_headers(plan: MergePlan) -> list[bytes]:
    """Each shard file's first bytes: the 8-byte header length, then the header."""
    by_shard: list[list[TensorTask]] = [[] for _ in plan.shards]
    for task in plan.tasks:
        by_shard[task.shard].append(task)
    return [struct.pack("<Q", len(h)) + h for h in map(shard_header, by_shard)]


def shard_is_whole(path: Path, head: bytes, data_bytes: int) -> bool:
    """An existing shard file with the planned header and size (a resumed merge keeps it)."""
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size == len(head) + data_bytes and f.read(len(head)) == head
    except OSError:
        return False


Written = Callable[[TensorTask, int, memoryview], None]  # task, file position, the bytes written


class ShardWriter:
    """Pre-sized shard files in `folder`; `write(task, tensor)` puts bytes at the planned offset.

    `reuse`: keep shard files that already have the planned header and size (a resumed merge);
    `create=False`: open the files another process created (a distributed merge's worker), never
    create or truncate one. `on_write` sees every write, e.g. to hash work units as they finish."""

    def __init__(
        self,
        folder: Path,
        plan: MergePlan,
        *,
        reuse: bool = False,
        create: bool = True,
        on_write: Written | None = None,
    ) -> None:
        self._fds: list[int] = []
        self._data_start: list[int] = []
        self._on_write = on_write
        for shard, head in zip(plan.shards, shard_headers(plan)):
            path = folder / shard.filename
            self._data_start.append(len(head))
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

    def write(self, task: TensorTask, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Put the whole tensor, or rows [r0, r1) of it, at the planned offset."""
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        position = self._data_start[task.shard] + task.offset
        expected = task.out_nbytes
        if rows is not None:
            row_bytes = task.out_nbytes // task.shape[0]
            position += rows[0] * row_bytes
            expected = (rows[1] - rows[0]) * row_bytes
        if data.nbytes != expected:
            raise AssertionError(f"{task.name}: {data.nbytes} bytes computed, {expected} planned")
        view, done = memoryview(data), 0
        while done < data.nbytes:
            done += os.pwrite(self._fds[task.shard], view[done:], position + done)
        if self._on_write is not None:
            self._on_write(task, position, view)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_index(folder: Path, plan: MergePlan) -> None:
    index = {
        "metadata": {"total_size": plan.bytes_written},
        "weight_map": {
            t.name: plan.shards[t.shard].filename for t in sorted(plan.tasks, key=lambda t: t.name)
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
