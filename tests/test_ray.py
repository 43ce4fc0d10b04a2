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
from conftest import assert_nothing_written, assert_user_error, run_cli, write_recipe

import mergekit_ri as m
from mergekit_ri import engine
from mergekit_ri.api import MergeOptions
from mergekit_ri.cli import _bare_ray
from mergekit_ri.events import MergeEvents
from mergekit_ri.resume import JOURNAL
from mergekit_ri.synthetic import LlamaShape, make_family

SHAPE = LlamaShape(vocab=2000, hidden=128, intermediate=344, layers=3, heads=4, kv_heads=2)
UNIT = "96KiB"


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


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
