"""Output work units: the merged checkpoint cut into runs of whole tensors, by bytes.

A unit is consecutive tensors of one shard, so its bytes are one contiguous range of that shard
file. It is the grain of resuming (the staging folder records each finished unit with a hash of
its bytes) and of distributed merges (one Ray task per unit). The cut depends on the plan alone
(not on how many workers run it), so a merge resumed on another layout finds the same units.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .io.contenthash import ReadHashes
from .io.sources import TensorRef
from .plan import MergePlan, TensorTask

UNITS_PER_OUTPUT = 64  # enough units to balance a few dozen workers and lose little on a resume
UNIT_MIN = 16 * 2**20  # a unit is worth a task's start-up (a Ray task: ~10 ms, rebuilding the plan)
UNIT_MAX = 2**30  # and is never more than a minute or so of one worker's reading


@dataclass(frozen=True)
class OutputUnit:
    """Tensors `plan.tasks[first:last]`, all in shard `shard`, at bytes [start, end) of its file."""

    index: int
    shard: int
    first: int
    last: int
    start: int
    end: int
    in_nbytes: int  # what computing it reads

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def unit_size(plan: MergePlan, requested: int | None = None) -> int:
    """Output bytes per unit: as asked, else 1/64 of the output within [16 MiB, 1 GiB]."""
    if requested is not None:
        return requested
    return min(max(plan.bytes_written // UNITS_PER_OUTPUT, UNIT_MIN), UNIT_MAX)


def plan_units(plan: MergePlan, size: int | None = None) -> list[OutputUnit]:
    """Consecutive tensors of a shard grouped until a group holds `unit_size` bytes; a tensor
    larger than that is a unit of its own."""
    from .io.writer import shard_headers

    target = unit_size(plan, size)
    starts = [len(head) for head in shard_headers(plan.shard_layouts())]
    units: list[OutputUnit] = []
    first, held = 0, 0
    for i, task in enumerate(plan.tasks):
        held += task.out_nbytes
        following = plan.tasks[i + 1] if i + 1 < len(plan.tasks) else None
        if following is None or following.shard != task.shard or held + following.out_nbytes > target:
            group = plan.tasks[first : i + 1]
            start = starts[task.shard] + group[0].offset
            inputs = sum(t.in_nbytes for t in group)
            units.append(OutputUnit(len(units), task.shard, first, i + 1, start, start + held, inputs))
            first, held = i + 1, 0
    return units


def unit_tasks(plan: MergePlan, units: list[OutputUnit]) -> list[TensorTask]:
    return [task for unit in units for task in plan.tasks[unit.first : unit.last]]


def unit_inputs(plan: MergePlan, unit: OutputUnit) -> list[TensorRef]:
    """Every input tensor a unit reads, in plan order: per task its base and experts (a copied
    tensor: its reference)."""
    refs: list[TensorRef] = []
    for task in plan.tasks[unit.first : unit.last]:
        refs += [
            r for r in ((task.base, *task.experts) if task.merge else (task.reference,)) if r is not None
        ]
    return refs


def input_digests(plan: MergePlan, unit: OutputUnit, content: ReadHashes) -> list[str | None]:
    """The sha256 (hex) of each of a finished unit's inputs as it was read, None where the reads
    did not cover it in order: what the journal and a worker's result carry, so that a resumed
    or distributed merge's card has the same content fingerprints."""
    return [d.hex() if (d := content.digest(ref)) is not None else None for ref in unit_inputs(plan, unit)]


def restore_input_digests(
    plan: MergePlan, unit: OutputUnit, digests: list[str | None] | None, content: ReadHashes
) -> None:
    """`input_digests` from elsewhere (a worker, the journal of an interrupted run) into `content`."""
    refs = unit_inputs(plan, unit)
    if digests is None or len(digests) != len(refs):
        return
    for ref, digest in zip(refs, digests):
        if digest is not None:
            content.add(ref, bytes.fromhex(digest))


def file_digest(path: Path, start: int, end: int, chunk: int = 1 << 24) -> str:
    """sha256 of bytes [start, end) of a file, read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                break
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


class UnitHashes:
    """Hashes each unit's bytes as the shard writer puts them and calls `finished(unit, sha256)`
    once all of them are written. The engine writes a unit's tensors in order; bytes that arrive
    out of order are hashed from the file instead when the unit is whole."""

    def __init__(
        self,
        plan: MergePlan,
        folder: Path,
        units: list[OutputUnit],
        finished: Callable[[OutputUnit, str], None],
    ) -> None:
        self._plan, self._folder, self._finished = plan, folder, finished
        self._unit_of = {plan.tasks[i].name: u for u in units for i in range(u.first, u.last)}
        self._hash: dict[int, hashlib._Hash] = {}
        self._next: dict[int, int] = {}
        self._left = {u.index: u.nbytes for u in units}
        self._in_order = {u.index: True for u in units}
        self._lock = threading.Lock()

    def __call__(self, name: str, position: int, data: memoryview) -> None:
        if not data.nbytes:  # an empty tensor: nothing to hash (empty units finish in empty_units)
            return
        unit = self._unit_of[name]
        with self._lock:
            if self._next.setdefault(unit.index, unit.start) != position:
                self._in_order[unit.index] = False
            if self._in_order[unit.index]:
                self._hash.setdefault(unit.index, hashlib.sha256()).update(data)
            self._next[unit.index] = position + data.nbytes
            self._left[unit.index] -= data.nbytes
            done = self._left[unit.index] == 0
        if done:
            if self._in_order[unit.index]:
                digest = self._hash.pop(unit.index).hexdigest()
            else:
                path = self._folder / self._plan.shards[unit.shard].filename
                digest = file_digest(path, unit.start, unit.end)
            self._finished(unit, digest)

    def empty_units(self, units: list[OutputUnit]) -> None:
        """Units of zero bytes (empty tensors only) see no write: finished here."""
        for unit in units:
            if unit.nbytes == 0:
                self._finished(unit, hashlib.sha256().hexdigest())


def node_name() -> str:
    """This machine, as error messages name it."""
    return os.uname().nodename
