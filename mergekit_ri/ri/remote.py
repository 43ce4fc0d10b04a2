"""RI on Ray: the experts not yet in the cache adapted as Ray tasks, one per expert, anywhere in
the cluster, when the merge runs on Ray (`--ray`, `distributed:`, `MergeOptions(ray=...)`).

Each task rebuilds RI's inputs from the recipe on its node (paths on a shared filesystem, or Hub
ids in that node's own cache, as the merge's tasks do), computes the expert's cache key again from
what it sees (another key: the node sees other inputs than the driver, refused), adapts the
expert with `train_experts` into a scratch folder of its own and returns the entry's files
(weights, config, the expert's tokenizer/processor files, the manifest) as bytes. The driver
writes them into a staging folder beside the cache entry, checks them against the shipped
manifest and renames the entry into place. It holds each entry's lock from before the task is
submitted until the entry is published, so merges started together still adapt each expert once,
and no worker needs to see, or lock, the driver's cache (flock is unreliable on network
filesystems). One code path, shared filesystem or not: an entry is one model's bytes, which
cross the network once either way.

Progress: each step is sent to a small actor (`ProgressLog`) that the driver drains while it
waits, so the bars move live, whichever node trains.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..distributed import stop_tasks, task_result
from ..errors import UserError

if TYPE_CHECKING:
    from ..distributed import Distributed
    from ..recipe import Recipe
    from .train import ReportFactory, TrainJob

POLL = 0.2  # seconds between progress drains while the tasks run


def task_resources(kind: str, cpus_per_task: float, gpus_per_task: float | None) -> tuple[float, float, int]:
    """(num_cpus, num_gpus, torch threads) of one expert's task. The thread count is the recipe's
    `cpus_per_task`, not whatever a node has, so an expert's bytes do not depend on where it lands
    (torch's CPU reductions differ with the thread count)."""
    gpus = (gpus_per_task or 1.0) if kind == "cuda" else 0.0
    return cpus_per_task, gpus, max(1, int(cpus_per_task))


class ProgressLog:
    """A Ray actor: the steps the tasks report, kept until the driver takes them."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, int, int, float, float]] = []

    def put(self, item: tuple[str, int, int, float, float]) -> None:
        self._steps.append(item)

    def take(self) -> list[tuple[str, int, int, float, float]]:
        taken, self._steps = self._steps, []
        return taken


def train_on_ray(
    cluster: Distributed,
    recipe: Recipe,
    recipe_dir: Path | None,
    job: TrainJob,
    labels: list[str],
    report: ReportFactory | None = None,
) -> tuple[dict[str, bool], dict[str, str]]:
    """Adapt `labels` as Ray tasks into the driver's cache entries (`job.folders`).

    Returns label → True if trained here, False if another merge had cached it meanwhile, and
    label → where it was trained ("ray:<node ip>/cpu", "ray:<node ip>/cuda:<gpu id>")."""
    from .cache import discard, entry_problem, warn_bad_entry
    from .train import cache_lock

    ray = cluster.connect()
    kind = cluster.device(recipe.device).type
    done: dict[str, bool] = {}
    held: dict[str, contextlib.ExitStack] = {}
    try:
        for label in sorted(labels, key=lambda name: str(job.folders[name])):  # one order: no deadlock
            folder = job.folders[label]
            held[label] = contextlib.ExitStack()
            held[label].enter_context(cache_lock(folder))
            problem = entry_problem(folder)
            if problem is None:
                done[label] = False
                held.pop(label).close()
            elif problem != "missing":
                warn_bad_entry(folder, problem)
                discard(folder)
        todo = [label for label in labels if label in held]
        places = _run(ray, cluster, recipe, recipe_dir, job, todo, kind, report, held) if todo else {}
    finally:
        for lock in held.values():
            lock.close()
    done.update(dict.fromkeys(places, True))
    return done, places


def _run(
    ray: Any,
    cluster: Distributed,
    recipe: Recipe,
    recipe_dir: Path | None,
    job: TrainJob,
    todo: list[str],
    kind: str,
    report: ReportFactory | None,
    held: dict[str, contextlib.ExitStack],
) -> dict[str, str]:
    """One task per expert; each result published (and its lock released) as it arrives."""
    cpus, gpus, threads = task_resources(kind, cluster.cpus_per_task, cluster.gpus_per_task)
    task = ray.remote(adapt_on_worker).options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_retries=cluster.retries,
        retry_exceptions=False,
        name="ri-merge-adapt",
    )
    progress = ray.remote(ProgressLog).options(num_cpus=0).remote() if report is not None else None
    shared = ray.put((recipe, recipe_dir))
    pending = {
        task.remote(shared, label, job.folders[label].parent.name, kind, threads, progress): label
        for label in todo
    }
    bars: dict[str, Any] = {}
    places: dict[str, str] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL)
            if progress is not None and report is not None:
                for label, steps, step, l1, l2 in ray.get(progress.take.remote()):
                    if label not in bars:
                        bars[label] = report(label, steps)
                    bars[label](step, l1, l2)
            for ref in ready:
                label = pending.pop(ref)
                result = _result(ray, ref, label, cluster.retries)
                publish_shipped(result["files"], job.folders[label], label)
                held.pop(label).close()
                places[label] = f"ray:{result['node']}/{result['device']}"
    finally:
        stop_tasks(ray, pending, progress)
    return places


def _result(ray: Any, ref: Any, label: str, retries: int) -> dict[str, Any]:
    """One expert's result (bad input and RI's own errors: UserError, from the task)."""
    return task_result(
        ray,
        ref,
        f"RI adaptation of expert '{label}'",
        lambda why: UserError(
            f"RI adaptation of expert '{label}' failed {retries + 1} time(s) on the Ray cluster ({why}); "
            "the experts adapted so far are cached: rerun to adapt the rest"
        ),
    )


def publish_shipped(files: dict[str, bytes], folder: Path, label: str) -> None:
    """Write an entry a worker shipped beside `folder`, check it against its own manifest and
    rename it into place. The caller holds the entry's lock."""
    from .cache import MANIFEST, entry_problem
    from .train import publish_entry

    for name in files:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise RuntimeError(
                f"RI: the entry shipped for expert '{label}' names a file outside it: {name!r}"
            )
    if MANIFEST not in files:
        raise RuntimeError(f"RI: the entry shipped for expert '{label}' has no manifest")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        problem = entry_problem(staging)
        if problem is not None:
            raise RuntimeError(
                f"RI: the entry shipped for expert '{label}' does not match its manifest ({problem})"
            )
        publish_entry(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def adapt_on_worker(
    shared: tuple[Recipe, Path | None], label: str, key: str, kind: str, threads: int, progress: Any
) -> dict[str, Any]:
    """A Ray task: adapt one expert on this node; the cache entry's files, the node and device.
    Bad input (a path this node cannot see, other inputs than the driver's, a diverging loss) is
    a UserError naming the node."""
    from ..units import node_name

    recipe, recipe_dir = shared
    try:
        return _adapt(recipe, recipe_dir, label, key, kind, threads, progress)
    except UserError as exc:
        raise UserError(f"Ray worker on {node_name()}: {exc}") from None


def _adapt(
    recipe: Recipe, recipe_dir: Path | None, label: str, key: str, kind: str, threads: int, progress: Any
) -> dict[str, Any]:
    import ray
    import torch

    from .prepare import entry_keys, ri_context, ri_settings
    from .train import TrainJob, train_experts

    torch.set_num_threads(threads)
    ctx = ri_context(recipe, recipe_dir)
    settings = ri_settings(recipe)
    keys, seeds = entry_keys(recipe, ctx, settings)
    if keys.get(label) != key:
        raise UserError(
            f"RI: the inputs this node sees differ from the driver's (expert '{label}': other files at the "
            "same paths?)"
        )
    if kind == "cuda":
        gpu = ray.get_gpu_ids()
        where = f"cuda:{gpu[0]}" if gpu else "cuda"
    else:
        where = "cpu"
    with tempfile.TemporaryDirectory(prefix="ri-merge-adapt-") as scratch:
        folders = {name: Path(scratch) / keys[name] / name for name in keys}
        job = TrainJob(ctx.experts, ctx.base, ctx.model_class, ctx.heads, ctx.aux, settings, folders, seeds)
        train_experts(job, [label], torch.device(kind), _report(ray, progress))
        entry = folders[label]
        files = {
            p.relative_to(entry).as_posix(): p.read_bytes() for p in sorted(entry.rglob("*")) if p.is_file()
        }
    return {"files": files, "node": ray.util.get_node_ip_address(), "device": where}


def _report(ray: Any, progress: Any) -> ReportFactory | None:
    """Steps to the progress actor; the last one waited for, so every step is logged before the
    task's result reaches the driver."""
    if progress is None:
        return None

    def start(label: str, steps: int):
        def step(index: int, l1: float, l2: float) -> None:
            sent = progress.put.remote((label, steps, index, l1, l2))
            if index == steps:
                ray.get(sent)

        return step

    return start
