"""docs/ci.md's GitHub Actions job, run step by step as a CI runner would (bash, fail on the
first non-zero exit) on the demo models: validate, merge, check the manifest. Install and upload
are skipped (they need the network); everything else runs exactly as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergekit_ri.synthetic import make_family

ROOT = Path(__file__).resolve().parents[1]


def job_steps() -> list[dict]:
    text = (ROOT / "docs" / "ci.md").read_text()
    workflow = yaml.safe_load(re.search(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M).group(1))
    return workflow["jobs"]["merge"]["steps"]


def run_step(script: str, cwd: Path) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(cwd)},
    )


def runnable(step: dict) -> bool:
    return "run" in step and step.get("name") not in ("Install", "Upload")


def workspace(tmp_path: Path) -> Path:
    """A checkout holding recipe.yaml, with the demo recipe's models beside it."""
    make_family(tmp_path, ["expert_math", "expert_code"], shards=2)
    shutil.copyfile(ROOT / "configs" / "demo.yaml", tmp_path / "recipe.yaml")
    return tmp_path


@pytest.mark.slow
def test_the_documented_job_passes_on_the_demo_models(tmp_path: Path) -> None:
    steps = job_steps()
    assert [s.get("name") for s in steps if "run" in s][-1] == "Upload"
    cwd = workspace(tmp_path)
    for step in filter(runnable, steps):
        done = run_step(step["run"], cwd)
        assert done.returncode == 0, (step["name"], done.stdout, done.stderr)
    assert (cwd / "merged" / "model.safetensors.index.json").is_file()
    assert "files match the manifest" in done.stdout


@pytest.mark.slow
def test_the_check_step_catches_a_changed_file(tmp_path: Path) -> None:
    cwd = workspace(tmp_path)
    steps = [s for s in job_steps() if runnable(s)]
    for step in steps[:-1]:
        assert run_step(step["run"], cwd).returncode == 0
    shard = next((cwd / "merged").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    done = run_step(steps[-1]["run"], cwd)
    assert done.returncode != 0 and "does not match the manifest" in done.stderr


def test_the_validate_step_fails_fast_on_a_bad_recipe(tmp_path: Path) -> None:
    cwd = workspace(tmp_path)
    (cwd / "recipe.yaml").write_text(
        (cwd / "recipe.yaml").read_text().replace("merge_method: ties", "merge_method: tie")
    )
    validate = next(s for s in job_steps() if s.get("name", "").startswith("Validate"))
    done = run_step(validate["run"], cwd)
    assert done.returncode == 2 and "did you mean 'ties'" in done.stderr
