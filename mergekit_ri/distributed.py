"""Distributed merges on Ray: one Ray task per output work unit.

The driver plans from headers as a single-process merge does, creates the pre-sized shard files
in the staging folder and cuts the output into work units (`units.py`). Each Ray task rebuilds the
plan from the recipe on its own node (its inputs: a shared filesystem, or that node's Hub cache),
checks it against the driver's (`resume.layout_digest`), computes its tensors with the same
kernels, writes their bytes at the planned offsets of the shard files (the staging folder must
be on a filesystem every node sees) and returns the sha256 of each unit. The driver journals
every finished unit (so `--resume` works here too), aggregates progress, writes the index,
config, tokenizer and card, and publishes atomically. A task whose worker or node is lost is
retried up to `retries` times by Ray; rewriting a unit writes the same bytes to the same place.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch

from . import unit_progress
from .errors import ResumableError, UserError

if TYPE_CHECKING:
    from .engine import Progress
    from .methods.registry import PassFold, PassMap, PassScan
    from .plan import MergePlan
    from .recipe import Recipe
    from .resume import Journal
    from .units import OutputUnit

EXTRA = "pip install 'mergekit-ri[ray]'"
CONNECT_TIMEOUT = 5.0  # seconds to reach a cluster's address before ray.init is tried at all


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed: {EXTRA}") from None
    return ray


def _probe(address: str) -> None:
    """Refuse in seconds an address nothing listens on (ray.init would retry for minutes)."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise UserError(f"Ray address '{address}' is not host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise UserError(f"cannot reach the Ray cluster at {address}: {why}") from None


@dataclass
class Distributed:
    """Where and how a merge's units run on Ray. `recipe` and `folder` are what the driver's plan
    was built from: every task builds the same plan from them on its own node."""

    address: str  # host:port, ray://host:port, auto, or local (Ray's default lookup)
    recipe: Recipe
    folder: Path | None
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None
    retries: int = 3
    _ray: Any = None
    _started: bool = False
    _gpus: float = field(default=0.0)

    def connect(self) -> Any:
        """Join the cluster (or reuse this process's connection); refuses an unreachable one."""
        if self._ray is not None:
            return self._ray
        ray = import_ray()
        if self.address not in ("auto", "local"):
            _probe(self.address)
        if not ray.is_initialized():  # else: this process already joined a cluster (ray.init)
            quiet = logging.getLogger("ray")
            level, quiet.level = quiet.level, logging.ERROR  # Ray's start-up notes are not ours to print
            main = threading.current_thread() is threading.main_thread()
            sigterm = signal.getsignal(signal.SIGTERM) if main else None
            try:
                ray.init(
                    address=None if self.address == "local" else self.address,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    include_dashboard=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"cannot join the Ray cluster at {self.address}: {first}") from None
            finally:
                quiet.setLevel(level)
                if main and sigterm is not None:  # ray.init's own handler exits at once (sys.exit):
                    signal.signal(signal.SIGTERM, sigterm)  # ours stops as Ctrl-C does, units kept
            self._started = True
        self._ray = ray
        self._gpus = float(ray.cluster_resources().get("GPU", 0))
        return ray

    def close(self) -> None:
        """Leave the cluster if this merge joined it (a local one it started stops with it)."""
        if self._started and self._ray is not None:
            self._ray.shutdown()
        self._ray, self._started = None, False

    def device(self, requested: str) -> torch.device:
        """The kind of device every task merges on: cuda (the GPU Ray gives the task) when asked
        for, or when `auto` and the cluster has GPUs; else cpu."""
        self.connect()
        kind = requested.split(":")[0]
        if kind == "cuda" and not self._gpus:
            raise UserError(
                f"device '{requested}' requested but the Ray cluster at {self.address} has no GPU"
            )
        if kind == "auto":
            kind = "cuda" if self._gpus and self.gpus_per_task != 0 else "cpu"
        return torch.device(kind)

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
        """Every unit of `todo` as a Ray task; returns the warnings the tasks found."""
        from .resume import layout_digest

        ray = self.connect()
        remote = self._task(merge_units, "ri-merge-unit", target)
        recipe = ray.put((self.recipe, self.folder, layout_digest(plan)))
        fine = bool(todo) and max(u.in_nbytes for u in todo) >= unit_progress.FINE_PROGRESS
        actor = ray.remote(unit_progress.UnitProgress).options(num_cpus=0).remote() if fine else None
        progress = unit_progress.Aggregate(ray, actor, advance, {u.index: u.in_nbytes for u in todo})
        pending = {
            remote.remote(
                recipe,
                str(staging),
                [unit],
                target.type,
                prefetch,
                thresholds,
                progress=actor,
                fingerprint=fingerprint,
            ): unit
            for unit in todo
        }
        warnings: list[str] = []
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=unit_progress.REPORT_EVERY)
                progress.poll()
                for ref in ready:
                    unit = pending.pop(ref)
                    result = self._result(ray, ref, unit)
                    for index, digest in result["units"]:
                        inputs = result.get("inputs", {}).get(index)
                        journal.record(unit, digest, plan, result["warnings"], inputs)
                    warnings += result["warnings"]
                    progress.finished(unit.index)
        finally:
            stop_tasks(ray, pending, actor)
        return list(dict.fromkeys(warnings))

    def scan(
        self,
        plan: MergePlan,
        units: list[OutputUnit],
        target: torch.device,
        prefetch: int,
        advance: Progress,
    ) -> PassScan:
        """A pre-pass (`methods.registry.PassScan`) as Ray tasks, one per work unit holding merged
        tensors: each reads its unit's inputs on its node and folds their parts; the driver folds
        what the tasks return (small: e.g. TIES's histograms), so no tensor crosses the network."""
        from .resume import layout_digest

        ray = self.connect()
        remote = self._task(scan_units, "ri-merge-prepass", target)
        shared = ray.put((self.recipe, self.folder, layout_digest(plan)))
        merged = {u.index: sum(t.in_nbytes for t in plan.tasks[u.first : u.last] if t.merge) for u in units}
        todo = [u for u in units if merged[u.index]]

        def scan(part: PassMap, fold: PassFold) -> Any:
            pending = {
                remote.remote(shared, [unit], target.type, prefetch, part, fold): unit for unit in todo
            }
            folded = None
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        unit = pending.pop(ref)
                        piece = self._result(ray, ref, unit)
                        if piece is not None:
                            folded = piece if folded is None else fold(folded, piece)
                        advance(merged[unit.index])
            finally:
                stop_tasks(ray, pending)
            return folded

        return scan

    def _task(self, fn: Any, name: str, target: torch.device) -> Any:
        """`fn` as a Ray task with this merge's resources and bounded retries (a lost worker or
        node is retried; an exception raised by `fn` itself is not: it would fail again)."""
        gpus = (self.gpus_per_task if self.gpus_per_task is not None else 1.0) if target.type == "cuda" else 0
        return self._ray.remote(fn).options(
            num_cpus=self.cpus_per_task,
            num_gpus=gpus,
            max_retries=self.retries,
            retry_exceptions=False,
            name=name,
        )

    def _result(self, ray: Any, ref: Any, unit: OutputUnit) -> Any:
        """One unit's result; workers or nodes lost past the retries: ResumableError, the
        finished units kept."""
        return task_result(
            ray,
            ref,
            f"work unit {unit.index}",
            lambda why: ResumableError(
                f"work unit {unit.index} failed {self.retries + 1} time(s) on the Ray cluster ({why}); "
                "the finished units are kept: rerun with --resume"
            ),
        )


def task_result(ray: Any, ref: Any, what: str, lost: Callable[[str], Exception]) -> Any:
    """A Ray task's result, or its failure as one line: bad input it found (a UserError) as it is,
    any other error it raised as an internal error naming `what`, and a worker or node lost past
    the retries as `lost(Ray's first line of why)`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise RuntimeError(f"{what} failed on a Ray worker: {cause!r}") from None
    except ray.exceptions.RayError as exc:
        raise lost(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None


def stop_tasks(ray: Any, pending: dict[Any, Any], actor: Any = None) -> None:
    """After Ctrl-C, SIGTERM or a failed task: stop the running tasks, drop the queued ones."""
    try:
        for ref in pending:
            ray.cancel(ref)
        if actor is not None:
            ray.kill(actor)
    except Exception:  # a local cluster a terminal's Ctrl-C reached too: gone, nothing to stop
        pass


_PLANS: dict[tuple[str, str, str], MergePlan] = {}  # a worker runs many units of one merge: planned once


def _worker_plan(recipe: Recipe, folder: Path | None, digest: str) -> MergePlan:
    from .plan import build_plan
    from .resume import layout_digest

    key = (recipe.to_yaml(), str(folder), digest)
    if key not in _PLANS:
        plan = build_plan(recipe, folder)
        if layout_digest(plan) != digest:
            raise UserError(
                "the inputs this node sees differ from the driver's (other files at the same paths?)"
            )
        _PLANS.clear()
        _PLANS[key] = plan
    return _PLANS[key]


def merge_units(
    shared: tuple[Recipe, Path | None, str],
    staging: str,
    units: list[OutputUnit],
    device: str,
    prefetch: int,
    thresholds: tuple[float, ...] | None,
    label: str = "Ray worker",
    progress: Any = None,
    fingerprint: bool = False,
) -> dict[str, Any]:
    """A Ray task (or a `--devices` worker): compute `units` into the staging folder's shard
    files; their sha256s (with `fingerprint`, their inputs' too, for the card). Bad input it finds
    is a UserError naming the worker and its machine. `progress`: the driver's `UnitProgress`
    actor, told the input bytes merged as they go."""
    from .engine import write_units
    from .io.contenthash import ReadHashes
    from .io.sources import TensorReader
    from .kernels.parallel import single_threaded_ops
    from .memory import plan_memory, return_freed_memory
    from .nonfinite import NonFiniteGuard
    from .units import input_digests, node_name

    recipe, folder, digest = shared
    try:
        plan = _worker_plan(recipe, folder, digest)
        folder_seen = Path(staging)
        if not folder_seen.is_dir():
            raise UserError(
                f"cannot see the staging folder {folder_seen}: the output must be on a filesystem "
                "every node shares"
            )
        target = torch.device(device)
        finished: list[tuple[int, str]] = []
        inputs: dict[int, list[str | None]] = {}  # each unit's inputs' sha256, for the card

        def done(unit: OutputUnit, digest: str) -> None:
            if content is not None:
                inputs[unit.index] = input_digests(plan, unit, content)
            finished.append((unit.index, digest))

        with TensorReader() as reader, ThreadPoolExecutor(2, "ri-read") as reads:
            guard = NonFiniteGuard(plan, reader, plan.recipe.on_nonfinite)
            memory = plan_memory(plan, prefetch=prefetch, device=target.type)
            return_freed_memory(memory.mmap_threshold)  # as the driver's own merge does
            content = ReadHashes(memory.content_hash_bytes) if fingerprint else None  # for the card
            reader.observe = content
            blocked = plan.method.raw_inputs and target.type == "cpu"
            with single_threaded_ops() if blocked else nullcontext():
                write_units(
                    plan,
                    folder_seen,
                    units,
                    reader,
                    reads,
                    target,
                    memory,
                    unit_progress.Reporter(progress, units[0].index)
                    if progress is not None and units
                    else lambda n: None,
                    None,
                    thresholds,
                    guard,
                    done,
                    create=False,
                )
        return {
            "units": finished,
            "inputs": inputs,
            "warnings": list(guard.warnings),
            "node": node_name(),
            "pid": os.getpid(),
        }
    except UserError as exc:
        raise UserError(f"{label} on {node_name()}: {exc}") from None


def scan_units(
    shared: tuple[Recipe, Path | None, str],
    units: list[OutputUnit],
    device: str,
    prefetch: int,
    part: PassMap,
    fold: PassFold,
    label: str = "Ray worker",
) -> Any:
    """A Ray task of a pre-pass: `part` of every merged tensor of `units`, folded (None if none)."""
    from .engine import scan_tasks
    from .io.sources import TensorReader
    from .memory import plan_memory
    from .units import node_name, unit_tasks

    recipe, folder, digest = shared
    try:
        plan = _worker_plan(recipe, folder, digest)
        tasks = [t for t in unit_tasks(plan, units) if t.merge]
        target = torch.device(device)
        memory = plan_memory(plan, prefetch=prefetch, device=target.type)
        with TensorReader() as reader, ThreadPoolExecutor(2, "ri-read") as reads:
            return (
                scan_tasks(plan, tasks, reader, reads, target, memory, part, fold, lambda n: None)
                if tasks
                else None
            )
    except UserError as exc:
        raise UserError(f"{label} on {node_name()}: {exc}") from None
