"""Several devices of one machine without Ray (`--devices cuda:0,cuda:1`): one worker process per
device, each merging whole work units, handed out one at a time as workers finish.

Processes rather than threads: each worker has its own CUDA context, its own torch thread pool
and its own kernel state (the C kernels' non-finite watch is per process), and one that dies
cannot take the others' memory with it. A worker runs the same task body as a Ray task
(`distributed.merge_units`), so the bytes are the same as one process's and a Ray cluster's; the
driver journals each finished unit, so `--resume` works here too.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ResumableError, UserError

if TYPE_CHECKING:
    from .engine import Progress
    from .plan import MergePlan
    from .recipe import Recipe
    from .resume import Journal
    from .units import OutputUnit


def parse_devices(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`cuda:0,cuda:1` → ('cuda:0', 'cuda:1'); one kind only (CPU and GPU bytes may differ)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    if not names or any(not n for n in names):
        raise UserError("devices: give a comma-separated list such as cuda:0,cuda:1")
    for name in names:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
            raise UserError(f"devices: unknown device '{name}'; use cpu, cuda or cuda:N")
    if len({n.split(":")[0] for n in names}) > 1:
        raise UserError("devices: cpu and cuda mixed; give devices of one kind")
    return tuple(names)


def _pin(device: str, threads: int) -> None:
    """Worker start-up: a share of the cores for a CPU worker, its own GPU for a CUDA one. A
    terminal's Ctrl-C reaches the whole process group: the driver alone answers it (it stops the
    workers and keeps the finished units); a worker idle between units would otherwise die of it
    first and be reported as lost (exit 2 instead of 130)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))


@dataclass
class LocalDevices:
    """The units of a merge spread over local devices, one worker process each."""

    devices: tuple[str, ...]
    recipe: Recipe
    folder: Path | None
    _pools: list[ProcessPoolExecutor] = field(default_factory=list)

    def device(self, requested: str) -> torch.device:
        from .engine import resolve_device

        for name in self.devices:
            resolve_device(name)  # every GPU named must exist
        return torch.device(self.devices[0].split(":")[0])

    def scan(
        self, plan: MergePlan, units: list[OutputUnit], target: torch.device, prefetch: int, advance: Progress
    ) -> None:
        """A pre-pass runs in the driver: it reads from the same disks the workers would."""
        return None

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()

    def run(
        self,
        plan: MergePlan,
        staging: Path,
        todo: list[OutputUnit],
        target: torch.device,
        prefetch: int,
        thresholds: tuple[float, ...] | None,
        journal: Journal,
        advance: Progress,
        fingerprint: bool = False,
    ) -> list[str]:
        """Every unit of `todo` on the first free device; returns the warnings the workers found."""
        from .distributed import merge_units
        from .resume import layout_digest

        context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA or threads
        threads = max(1, (os.cpu_count() or 1) // len(self.devices)) if target.type == "cpu" else 1
        self._pools = [
            ProcessPoolExecutor(1, mp_context=context, initializer=_pin, initargs=(name, threads))
            for name in self.devices
        ]
        shared = (self.recipe, self.folder, layout_digest(plan))
        queue = list(reversed(todo))
        running: dict[Future, tuple[int, OutputUnit]] = {}

        def submit(slot: int) -> None:
            if queue:
                unit = queue.pop()
                name = self.devices[slot]
                future = self._pools[slot].submit(
                    merge_units,
                    shared,
                    str(staging),
                    [unit],
                    name,
                    prefetch,
                    thresholds,
                    f"worker for {name}",
                    fingerprint=fingerprint,
                )
                running[future] = (slot, unit)

        for slot in range(len(self.devices)):
            submit(slot)
        warnings: list[str] = []
        try:
            while running:
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    slot, unit = running.pop(future)
                    result = self._result(future, slot, unit)
                    for index, digest in result["units"]:
                        inputs = result.get("inputs", {}).get(index)
                        journal.record(unit, digest, plan, result["warnings"], inputs)
                    warnings += result["warnings"]
                    advance(unit.in_nbytes)
                    submit(slot)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the units in progress are not waited for
            self._terminate()
            raise
        return list(dict.fromkeys(warnings))

    def _terminate(self) -> None:
        """Stop the workers now: a unit cut short is not journaled, so --resume computes it again."""
        for pool in self._pools:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.join(timeout=10)

    def _result(self, future: Future, slot: int, unit: OutputUnit) -> dict[str, Any]:
        try:
            return future.result()
        except UserError as exc:
            raise UserError(str(exc)) from None
        except BrokenProcessPool:
            raise ResumableError(
                f"the worker for {self.devices[slot]} died computing work unit {unit.index}; "
                "the finished units are kept: rerun with --resume"
            ) from None
