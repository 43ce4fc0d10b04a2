"""Ctrl-C and SIGTERM during a merge: once a work unit is finished and journaled, the staging
folder is kept (never an output that looks complete), the workers stop, one line says how many
units are kept and the command that continues; `--resume` then computes only the rest and writes
the same bytes as an uninterrupted merge. With nothing finished, everything is cleaned up."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path

import pytest
from conftest import run_cli, write_recipe
from helpers import CtrlC, folder_bytes, interrupted_cli_merge, journal_units

import mergekit_ri as m
from mergekit_ri import cli, distributed, resume
from mergekit_ri.api import MergeOptions
from mergekit_ri.errors import MergeInterrupted
from mergekit_ri.io.output import STOPPED
from mergekit_ri.resume import JOURNAL
from mergekit_ri.synthetic import LlamaShape, make_family

SHAPE = LlamaShape(vocab=512, hidden=64, intermediate=160, layers=3, heads=4, kv_heads=2)
UNIT = "8KiB"  # many units from a small model


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return make_family(tmp_path / "models", ["a", "b", "c"], shape=SHAPE, dtype="bfloat16", shards=2)


def recipe(tmp_path: Path, models: dict[str, Path], method: str = "dare_ties") -> Path:
    return write_recipe(
        tmp_path / "recipe.yaml",
        merge_method=method,
        base_model=str(models["base"]),
        models=[{"model": str(models[n]), "parameters": {"weight": 0.5, "density": 0.4}} for n in "abc"],
        out_shard_size="200KB",
        seed=7,
    )


def stagings(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.ri-merge-partial-*"))


def interrupted(path: Path, out: Path, after: int) -> tuple[MergeInterrupted, Path, list[int]]:
    """An API merge stopped by Ctrl-C after `after` units: the exception, the staging folder it
    left and the units its journal holds."""
    with pytest.raises(MergeInterrupted) as stopped:
        m.merge(path, out, options=MergeOptions(unit_size=UNIT), events=CtrlC(out, after))
    [staging] = stagings(out)
    return stopped.value, staging, journal_units(staging)


def test_api_interrupt_keeps_finished_units_and_resume_completes_them(tmp_path: Path, models) -> None:
    path = recipe(tmp_path, models)
    reference = m.merge(path, tmp_path / "reference", options=MergeOptions(unit_size=UNIT))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as stopped:  # what an API caller catches, as for any Ctrl-C
        m.merge(path, out, options=MergeOptions(unit_size=UNIT), events=CtrlC(out, 3))
    assert isinstance(stopped.value, MergeInterrupted)
    total = len(reference.units["computed"])
    [staging] = stagings(out)
    journaled = journal_units(staging)
    assert stopped.value.kept == len(journaled) >= 3 and stopped.value.total == total > len(journaled)
    assert not out.exists() and (staging / STOPPED).is_file()
    assert not (staging / "model.safetensors.index.json").exists()  # nothing looks complete
    result = m.merge(path, out, options=MergeOptions(unit_size=UNIT, resume=True))
    assert list(result.units["kept"]) == journaled  # each journaled unit's bytes verified
    assert sorted([*result.units["kept"], *result.units["computed"]]) == list(range(total))
    assert folder_bytes(out) == folder_bytes(tmp_path / "reference")
    assert not (out / STOPPED).exists() and not (out / JOURNAL).exists()
    assert stagings(out) == []


def test_interrupting_a_resume_while_it_verifies_keeps_the_folder(
    tmp_path: Path, models, monkeypatch
) -> None:
    """Re-hashing a big output's finished units takes a while: Ctrl-C then must not lose them."""
    path = recipe(tmp_path, models)
    out = tmp_path / "out"
    _, _, journaled = interrupted(path, out, 3)

    def ctrl_c(*args: object) -> str:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(resume, "file_digest", ctrl_c)
        with pytest.raises(MergeInterrupted) as stopped:
            m.merge(path, out, options=MergeOptions(unit_size=UNIT, resume=True))
    assert stopped.value.kept == len(journaled)
    [staging] = stagings(out)
    assert journal_units(staging) == journaled
    result = m.merge(path, out, options=MergeOptions(unit_size=UNIT, resume=True))
    assert list(result.units["kept"]) == journaled


def test_api_interrupt_before_any_unit_is_finished_cleans_up(tmp_path: Path, models) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt) as stopped:
        m.merge(recipe(tmp_path, models), out, options=MergeOptions(unit_size=UNIT), events=CtrlC(out, 0))
    assert not isinstance(stopped.value, MergeInterrupted)
    assert not out.exists() and stagings(out) == []
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []


def test_a_stopped_staging_folder_of_a_live_process_is_adopted_or_cleaned(tmp_path: Path, models) -> None:
    """An API caller's interrupted merge leaves its folder while its process lives on (a notebook):
    the marker lets a `--resume` from another process adopt it, and a plain merge remove it."""
    path = recipe(tmp_path, models)
    out = tmp_path / "out"
    _, staging, journaled = interrupted(path, out, 2)
    alive = staging.with_name(f".out.ri-merge-partial-{os.getppid()}")  # another process, running
    staging.rename(alive)
    result = run_cli("merge", path, "-o", out, "--unit-size", UNIT, "--resume", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["units"]["kept"] == journaled
    assert not alive.exists() and stagings(out) == []
    with pytest.raises(MergeInterrupted):
        m.merge(path, out, options=MergeOptions(unit_size=UNIT, force=True), events=CtrlC(out, 2))
    stagings(out)[0].rename(alive)
    result = run_cli("merge", path, "-o", out, "--force")  # no --resume: starts over
    assert result.code == 0 and "stopped, kept for --resume" in result.stderr, result.stderr
    assert not alive.exists() and stagings(out) == []


def test_cli_interrupt_prints_the_units_kept_and_the_command(tmp_path: Path, models, monkeypatch) -> None:
    path = recipe(tmp_path, models)
    out = tmp_path / "out"
    ctrl_c, shown = CtrlC(out, 2), cli._Rendered.on_progress

    def on_progress(self, advance: int) -> None:
        shown(self, advance)
        ctrl_c.on_progress(advance)

    monkeypatch.setattr(cli._Rendered, "on_progress", on_progress)
    result = run_cli("merge", path, "-o", out, "--unit-size", UNIT)
    assert result.code == 130
    [staging] = stagings(out)
    kept = len(journal_units(staging))
    [line] = [line for line in result.stderr.splitlines() if line.startswith("interrupted")]
    assert line.startswith(f"interrupted: {kept} of ") and "work units finished and kept" in line
    # in-process (no argv to repeat): RECIPE -o OUT --resume
    assert line.endswith(f"continue with: {shlex.join(['ri-merge', str(path), '-o', str(out), '--resume'])}")


def test_sigterm_exits_143_and_sigint_130() -> None:
    cli._SIGNALLED.clear()
    assert cli._interrupted_code() == 130
    with pytest.raises(KeyboardInterrupt):
        cli._raise_interrupt(signal.SIGTERM, None)
    assert cli._interrupted_code() == 143
    cli._SIGNALLED.clear()


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signalled_merge_keeps_its_units_and_resumes_to_the_same_bytes(tmp_path: Path, sig, code) -> None:
    """A real `ri-merge` process: SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) once a few
    units are journaled; the printed command continues it and computes only the rest."""
    shape = LlamaShape(vocab=4000, hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4)
    models = make_family(tmp_path / "models", ["a", "b", "c"], shape=shape, dtype="bfloat16", shards=2)
    path = recipe(tmp_path, models, method="ties")
    reference, out = tmp_path / "reference", tmp_path / "out"
    done = run_cli("merge", path, "-o", reference, "--unit-size", "256KiB", "--json")
    total = len(json.loads(done.stdout)["units"]["computed"])
    args = [path, "-o", out, "--unit-size", "256KiB", "-q"]
    proc, stderr, staging = interrupted_cli_merge(args, out, sig)
    assert proc.returncode == code, stderr
    finished = journal_units(staging)
    command = shlex.join(["ri-merge", *map(str, args), "--resume"])
    assert stderr.strip().splitlines() == [
        f"interrupted: {len(finished)} of {total} work units finished and kept; continue with: {command}"
    ]
    assert not out.exists() and (staging / STOPPED).is_file() and len(finished) >= 3
    result = run_cli("merge", *shlex.split(command)[1:], "--json")  # the printed command
    assert result.code == 0, result.stderr
    units = json.loads(result.stdout)["units"]
    assert units["kept"] == finished  # each journaled unit whole: the one cut short is not among them
    assert sorted(units["kept"] + units["computed"]) == list(
        range(len(units["kept"]) + len(units["computed"]))
    )
    assert folder_bytes(out) == folder_bytes(reference)
    assert [p.name for p in tmp_path.iterdir() if "ri-merge" in p.name] == []


@pytest.mark.slow
def test_ctrl_c_at_a_terminal_stops_a_devices_merge_with_130(tmp_path: Path) -> None:
    """Ctrl-C at a terminal signals the workers of `--devices cpu,cpu` too: they leave it to the
    driver, which stops them, keeps the finished units and exits 130; the resume gives the bytes."""
    shape = LlamaShape(vocab=4000, hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4)
    models = make_family(tmp_path / "models", ["a", "b", "c"], shape=shape, dtype="bfloat16", shards=2)
    path = recipe(tmp_path, models, method="ties")
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert run_cli("merge", path, "-o", reference, "--unit-size", "256KiB", "-q").code == 0
    args = [path, "-o", out, "--unit-size", "256KiB", "-q", "--devices", "cpu,cpu"]
    proc, stderr, staging = interrupted_cli_merge(args, out, signal.SIGINT, group=True)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: ") and "--resume" in stderr
    finished = journal_units(staging)
    result = run_cli("merge", path, "-o", out, "--unit-size", "256KiB", "--resume", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["units"]["kept"] == finished
    assert folder_bytes(out) == folder_bytes(reference)


def test_joining_ray_keeps_the_clis_sigterm_handler(monkeypatch) -> None:
    """ray.init installs its own SIGTERM handler (sys.exit: the staging folder would go, exit 15);
    ours is put back, so SIGTERM stops a Ray merge as Ctrl-C does."""

    class FakeRay:
        def is_initialized(self) -> bool:
            return False

        def init(self, **kwargs: object) -> None:
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

        def cluster_resources(self) -> dict[str, float]:
            return {}

    monkeypatch.setattr(distributed, "import_ray", FakeRay)
    previous = signal.signal(signal.SIGTERM, cli._raise_interrupt)
    try:
        distributed.Distributed("local", None, None).connect()
        assert signal.getsignal(signal.SIGTERM) is cli._raise_interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
