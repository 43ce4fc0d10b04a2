"""Distributed merges on Ray (`--ray`, `distributed: {ray: ...}`): a local two-CPU Ray cluster is
started inside the tests; every output must be byte-identical to the single-process merge's.

Marked `ray` and `slow` (starting a cluster takes ~15 s here): `pytest -m "not slow"` skips them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_nothing_written, assert_user_error, run_cli, write_recipe
from helpers import CtrlC, folder_bytes, journal_units
from safetensors.torch import save_file

import mergekit_ri as m
from mergekit_ri import engine, unit_progress
from mergekit_ri.api import MergeOptions
from mergekit_ri.cli import _bare_ray
from mergekit_ri.errors import MergeInterrupted
from mergekit_ri.events import MergeEvents
from mergekit_ri.resume import JOURNAL
from mergekit_ri.synthetic import LlamaShape, make_family

SHAPE = LlamaShape(vocab=2000, hidden=128, intermediate=344, layers=3, heads=4, kv_heads=2)
UNIT = "96KiB"


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-models")
    return make_family(root, ["a", "b", "c"], shape=SHAPE, dtype="bfloat16", shards=2)


def recipe(tmp_path: Path, models: dict[str, Path], method: str, **extra) -> Path:
    fields = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[n]), "parameters": {"weight": 0.6, "density": 0.3}} for n in "abc"],
        "out_shard_size": "1MB",
        "seed": 3,
        **extra,
    }
    if method == "slerp":
        fields["models"] = [{"model": str(models["a"])}]
        fields["parameters"] = {"t": 0.3}
    return write_recipe(tmp_path / f"{method}.yaml", **fields)


def test_without_ray_installed_one_line_names_the_extra(tmp_path: Path, models, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError, as where it is absent
    out = tmp_path / "out"
    args = _bare_ray(["merge", str(recipe(tmp_path, models, "ties")), "--ray", "-o", str(out)])
    assert args[2] == "--ray=local"  # `ri-merge ... --ray -o OUT`: Ray's default cluster
    result = run_cli(*args)
    assert_user_error(result, "--ray needs Ray", "pip install 'mergekit-ri[ray]'")
    assert_nothing_written(out)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "method, extra",
    [
        ("ties", {}),
        ("ties", {"parameters": {"trim_scope": "model"}}),  # the whole-model pre-pass on the workers too
        ("dare_ties", {}),
        ("task_arithmetic", {}),
        ("slerp", {}),
    ],
)
def test_ray_merge_is_byte_identical_and_runs_on_the_workers(
    tmp_path: Path, cluster, models, method: str, extra: dict, monkeypatch
) -> None:
    path = recipe(tmp_path, models, method, **extra)
    single = m.merge(path, tmp_path / "single", options=MergeOptions(unit_size=UNIT, fingerprint_inputs=True))

    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("a unit or a pre-pass read was computed in the driver")

    monkeypatch.setattr(engine, "merge_tasks", not_here)  # the workers are other processes
    monkeypatch.setattr(engine, "scan_tasks", not_here)
    distributed = m.merge(
        path, tmp_path / "ray", options=MergeOptions(ray="local", unit_size=UNIT, fingerprint_inputs=True)
    )
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "single")
    assert "| content `" in (tmp_path / "ray" / "README.md").read_text()  # digests from the workers
    assert len(distributed.units["computed"]) == len(single.units["computed"]) > 4
    assert distributed.files == single.files
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []


@pytest.mark.ray
@pytest.mark.slow
def test_recipe_distributed_key_and_cli(tmp_path: Path, cluster, models) -> None:
    path = recipe(tmp_path, models, "ties", distributed={"ray": "local", "retries": 1})
    result = run_cli("merge", path, "-o", tmp_path / "out", "--unit-size", UNIT, "--json")
    assert result.code == 0, result.stderr
    assert len(json.loads(result.stdout)["units"]["computed"]) > 4
    plain = recipe(tmp_path, models, "ties")
    assert run_cli("merge", plain, "-o", tmp_path / "single", "-q").code == 0
    assert folder_bytes(tmp_path / "out") == folder_bytes(
        tmp_path / "single"
    )  # `distributed` is not in the card


class WorkerKiller(threading.Thread):
    """SIGKILLs the first process seen running a work unit (Ray titles it ray::ri-merge-unit)."""

    def __init__(self) -> None:
        super().__init__()
        self.killed: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and not self.killed:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if title.startswith(b"ray::ri-merge-unit"):
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed.append(int(pid))
                    break
            time.sleep(0.001)

    def __enter__(self) -> WorkerKiller:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_killed_mid_merge_is_retried(tmp_path: Path, cluster, models) -> None:
    path = recipe(tmp_path, models, "ties")
    m.merge(path, tmp_path / "single", options=MergeOptions(unit_size=UNIT))
    with WorkerKiller() as killer:
        m.merge(path, tmp_path / "ray", options=MergeOptions(ray="local", unit_size="32KiB"))
    assert killer.killed, "no unit was running long enough to be killed"
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "single")


@pytest.mark.ray
@pytest.mark.slow
def test_a_lost_worker_past_the_retries_keeps_the_finished_units_for_resume(
    tmp_path: Path, cluster, models
) -> None:
    m.merge(recipe(tmp_path, models, "dare_ties"), tmp_path / "single")  # one process
    path = recipe(tmp_path, models, "dare_ties", distributed={"ray": "local", "retries": 0})
    out = tmp_path / "out"
    with WorkerKiller() as killer, pytest.raises(m.UserError) as error:
        m.merge(path, out, options=MergeOptions(unit_size="32KiB"))
    assert killer.killed and "rerun with --resume" in str(error.value)
    [staging] = tmp_path.glob(".out.ri-merge-partial-*")
    journaled = sorted(
        {json.loads(line)["unit"] for line in (staging / JOURNAL).read_text().splitlines()[1:]}
    )
    result = m.merge(path, out, options=MergeOptions(unit_size="32KiB", resume=True))
    assert list(result.units["kept"]) == journaled
    assert set(result.units["computed"]).isdisjoint(journaled)
    assert folder_bytes(out) == folder_bytes(tmp_path / "single")


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_that_cannot_see_an_input(tmp_path: Path, cluster, models) -> None:
    """The driver planned from the headers; the workers find the expert gone (as on a node that
    does not mount the folder): one line naming the node and the path, nothing published."""
    hidden = models["c"].parent / "c-elsewhere"

    class Unmount(MergeEvents):
        def on_plan(self, plan, total_bytes: int) -> None:
            os.rename(models["c"], hidden)

    path = recipe(tmp_path, models, "task_arithmetic")
    out = tmp_path / "out"
    try:
        with pytest.raises(m.UserError) as error:
            m.merge(path, out, options=MergeOptions(ray="local", unit_size=UNIT), events=Unmount())
    finally:
        os.rename(hidden, models["c"])
    assert str(error.value).startswith("Ray worker on ") and str(models["c"]) in str(error.value)
    assert_nothing_written(out)


@pytest.mark.ray
@pytest.mark.slow
def test_unreachable_ray_address_is_refused(tmp_path: Path, models) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "out"
    path = recipe(tmp_path, models, "ties")
    command = [sys.executable, "-m", "mergekit_ri.cli", str(path), "-o", str(out), "--ray", "127.0.0.1:1"]
    env = {**os.environ, "PYTHONPATH": str(Path(engine.__file__).parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    result = type("R", (), {"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
    assert_user_error(result, "cannot reach the Ray cluster at 127.0.0.1:1")
    assert_nothing_written(out)


@pytest.mark.ray
@pytest.mark.parametrize("address", ["nohost", "http://:80"])
def test_malformed_ray_address_is_refused(tmp_path: Path, models, address: str) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "out"
    result = run_cli("merge", recipe(tmp_path, models, "ties"), "-o", out, "--ray", address)
    assert_user_error(result, f"Ray address '{address}'")
    assert_nothing_written(out)


# ---- RI on Ray: the experts' adaptation as Ray tasks --------------------------------------------


@pytest.fixture(scope="module")
def vits(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    from helpers import make_classifiers, vit

    root = tmp_path_factory.mktemp("ray-vit")
    folders = make_classifiers(root / "vit", vit, [3, 5, 2], drift=0.3)
    save_file(
        {"inputs": torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))},
        root / "aux.safetensors",
    )
    folders["aux"] = root / "aux.safetensors"
    return folders


def ri_ray_recipe(tmp_path: Path, vits: dict[str, Path], **ri) -> Path:
    from helpers import ri_recipe

    return ri_recipe(tmp_path, vits, vits["aux"], "task_arithmetic", steps=4, **ri)


class StepLog(MergeEvents):
    def __init__(self) -> None:
        self.steps: dict[str, list[int]] = {}

    def on_ri_start(self, expert: str, steps: int) -> None:
        self.steps[expert] = []

    def on_ri_step(self, expert: str, step: int, l1: float, l2: float) -> None:
        self.steps[expert].append(step)


@pytest.mark.ray
@pytest.mark.slow
def test_ri_on_ray_adapts_on_the_workers_with_the_local_bytes(
    tmp_path: Path, cluster, vits, monkeypatch
) -> None:
    """Each expert adapted by a Ray task (one CPU, so one torch thread) is byte for byte the
    expert adapted in process with one thread; the merged outputs are equal too."""
    from helpers import EXPERTS

    from mergekit_ri.ri import train

    path = ri_ray_recipe(tmp_path, vits)
    monkeypatch.setenv("RI_MERGE_CACHE", str(tmp_path / "cache-L"))
    local = m.merge(path, tmp_path / "local", options=MergeOptions(threads=1))

    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("an expert was adapted in the driver")

    monkeypatch.setattr(train, "_load", not_here)  # the Ray workers are other processes
    monkeypatch.setenv("RI_MERGE_CACHE", str(tmp_path / "cache-R"))
    events = StepLog()
    ray_run = m.merge(path, tmp_path / "ray", options=MergeOptions(ray="local"), events=events)

    ip = cluster.util.get_node_ip_address()
    assert sorted(ray_run.ri.trained) == EXPERTS and ray_run.ri.cache_hits == []
    assert ray_run.ri.devices == [f"ray:{ip}/cpu"] * 3
    assert events.steps == {e: [1, 2, 3, 4] for e in EXPERTS}  # every step came back, live or not
    for e in EXPERTS:
        shipped, trained_here = Path(ray_run.ri.adapted[e]), Path(local.ri.adapted[e])
        assert shipped.parent.name == trained_here.parent.name  # the same cache key
        assert folder_bytes(shipped) == folder_bytes(trained_here)  # weights, config, manifest
    # the same output, but for where the adapted experts were cached (named by the card and heads/)
    merged = {k: v.replace(b"cache-R", b"cache-L") for k, v in folder_bytes(tmp_path / "ray").items()}
    assert merged == folder_bytes(tmp_path / "local")
    assert not [p for p in (tmp_path / "cache-R").rglob("*") if ".partial-" in p.name]

    again = m.merge(path, tmp_path / "again", options=MergeOptions(ray="local"))
    assert sorted(again.ri.cache_hits) == EXPERTS and again.ri.trained == again.ri.devices == []


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_cancels_the_ray_tasks_and_keeps_the_finished_units(
    tmp_path: Path, cluster, models, monkeypatch
) -> None:
    path = recipe(tmp_path, models, "ties")
    single = m.merge(path, tmp_path / "single", options=MergeOptions(unit_size="32KiB"))
    total = len(single.units["computed"])
    cancelled: list[object] = []
    cancel = cluster.cancel
    monkeypatch.setattr(cluster, "cancel", lambda ref, **kw: (cancelled.append(ref), cancel(ref, **kw)))
    out = tmp_path / "out"
    with pytest.raises(MergeInterrupted) as stopped:
        m.merge(path, out, options=MergeOptions(ray="local", unit_size="32KiB"), events=CtrlC(out, 2))
    [staging] = tmp_path.glob(".out.ri-merge-partial-*")
    journaled = journal_units(staging)
    assert stopped.value.kept == len(journaled) >= 2 and stopped.value.total == total
    assert len(cancelled) == total - len(journaled) > 0  # every unit not journaled: cancelled
    assert not out.exists()
    monkeypatch.undo()
    monkeypatch.setattr(unit_progress, "FINE_PROGRESS", 0)  # the tasks report bytes as they go
    progress = Progress()
    result = m.merge(
        path, out, options=MergeOptions(ray="local", unit_size="32KiB", resume=True), events=progress
    )
    assert list(result.units["kept"]) == journaled
    assert sorted([*result.units["kept"], *result.units["computed"]]) == list(range(total))
    assert folder_bytes(out) == folder_bytes(tmp_path / "single")
    assert sum(progress.steps) == result.bytes_read  # every byte once: kept units, reports, the rest


class Progress(MergeEvents):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_progress(self, advance: int) -> None:
        self.steps.append(advance)


class FakeRay:
    """Ray's calls as `unit_progress` makes them, answered at once in this process."""

    @staticmethod
    def wait(refs: list, timeout: float) -> tuple[list, list]:
        return refs, []

    @staticmethod
    def get(ref: object) -> object:
        return ref


class FakeActor:
    def __init__(self) -> None:
        self.state = unit_progress.UnitProgress()
        self.report = type("M", (), {"remote": staticmethod(self.state.report)})
        self.snapshot = type("M", (), {"remote": staticmethod(self.state.snapshot)})


def test_progress_in_bytes_between_units_never_counts_a_byte_twice() -> None:
    """The tasks' reports move the bar between units; a retried task (reporting from zero again)
    never moves it back or past the unit, and a finished unit adds what is left of it."""
    actor, progress = FakeActor(), Progress()
    aggregate = unit_progress.Aggregate(FakeRay, actor, progress.on_progress, {0: 1000, 1: 500})
    first = unit_progress.Reporter(actor, 0, every=0)
    first(300)
    first(300)
    aggregate.poll()  # asks
    aggregate.poll()  # hears 600
    assert progress.steps == [600]
    retried = unit_progress.Reporter(actor, 0, every=0)  # the worker died; Ray runs unit 0 again
    retried(200)
    aggregate.poll()
    aggregate.poll()
    assert progress.steps == [600]
    retried(2000)  # more than the unit reads (a report cannot push the bar past it)
    unit_progress.Reporter(actor, 1, every=0)(100)
    aggregate.poll()
    aggregate.poll()
    assert progress.steps == [600, 400, 100]
    aggregate.finished(0)
    aggregate.finished(1)
    assert progress.steps == [600, 400, 100, 0, 400] and sum(progress.steps) == 1500
    throttled = unit_progress.Reporter(actor, 1, every=3600)
    throttled(450)  # the first report goes at once, the next ones at most once an interval
    throttled(50)
    assert actor.state.snapshot()[1] == 450


@pytest.mark.ray
@pytest.mark.slow
def test_ri_on_ray_a_diverging_expert_is_one_line(tmp_path: Path, cluster, vits) -> None:
    import shutil

    from safetensors.torch import load_file

    copies = {k: tmp_path / "vit" / k for k in ("base", "e0", "e1", "e2")}
    for name, folder in copies.items():
        shutil.copytree(vits[name], folder)
    weights = load_file(copies["e1"] / "model.safetensors")
    weights["vit.encoder.layer.0.output.dense.weight"][0, 0] = float("nan")
    save_file(weights, copies["e1"] / "model.safetensors", metadata={"format": "pt"})
    path = ri_ray_recipe(tmp_path, {**copies, "aux": vits["aux"]}, cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = run_cli("merge", path, "-o", out, "--ray", "local")
    assert_user_error(result, "Ray worker on ", "expert 'e1'", "step 1 of 4")
    assert_nothing_written(out)
    entries = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_dir()]
    assert "e1" not in entries and not [n for n in entries if ".partial-" in n]


@pytest.mark.ray
@pytest.mark.slow
def test_ri_on_ray_a_worker_that_cannot_see_an_expert(tmp_path: Path, cluster, vits, monkeypatch) -> None:
    """The driver hashed the experts; the workers then find one gone (as on a node that does not
    mount its folder): one line naming the node and the path, nothing cached or written."""
    from mergekit_ri.ri import prepare

    hidden = vits["e2"].parent / "e2-elsewhere"
    checked = prepare.is_cached

    def unmount_after_hashing(folder: Path) -> bool:
        if vits["e2"].exists():
            os.rename(vits["e2"], hidden)
        return checked(folder)

    monkeypatch.setattr(prepare, "is_cached", unmount_after_hashing)
    path = ri_ray_recipe(tmp_path, vits, cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "out"
    try:
        with pytest.raises(m.UserError) as error:
            m.merge(path, out, options=MergeOptions(ray="local"))
    finally:
        os.rename(hidden, vits["e2"])
    assert str(error.value).startswith("Ray worker on ") and str(vits["e2"]) in str(error.value)
    assert_nothing_written(out)
    assert not [p for p in (tmp_path / "cache").rglob("config.json")]


@pytest.mark.ray
@pytest.mark.slow
def test_the_driver_hears_the_tasks_bytes_while_they_run(cluster) -> None:
    """Through a real actor: the bar moves several times during one unit, then by the rest."""

    def reporting_task(actor: object, unit: int) -> int:  # local: pickled by value for the worker
        report = unit_progress.Reporter(actor, unit, every=0.05)
        for _ in range(10):
            report(100)
            time.sleep(0.1)
        return unit

    actor = cluster.remote(unit_progress.UnitProgress).options(num_cpus=0).remote()
    cluster.get(actor.snapshot.remote())  # started
    progress = Progress()
    aggregate = unit_progress.Aggregate(cluster, actor, progress.on_progress, {7: 1500})
    task = cluster.remote(reporting_task).remote(actor, 7)
    while not cluster.wait([task], timeout=0.05)[0]:
        aggregate.poll()
    during = list(progress.steps)
    aggregate.finished(cluster.get(task))
    cluster.kill(actor)
    assert len(during) >= 3 and 0 < sum(during) <= 1000, during
    assert sum(progress.steps) == 1500
