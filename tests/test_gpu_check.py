"""scripts/gpu_check.sh and scripts/gpu_pipeline.py without a GPU: the shell script parses and
names only files that exist, and the pipeline check runs end to end on the CPU (`--tiny`),
comparing, timing and reporting as it will on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_the_gpu_check_parses_and_every_file_it_runs_exists():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    named = set(re.findall(r"\b((?:scripts|tests)/[\w/]+\.py)\b", SCRIPT.read_text()))
    assert {"scripts/gpu_pipeline.py", "tests/test_gpu.py", "tests/test_staging.py"} <= named
    assert [path for path in sorted(named) if not (ROOT / path).is_file()] == []


@pytest.fixture(scope="module")
def pipeline():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("gpu_pipeline", ROOT / "scripts" / "gpu_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_pipeline_check_runs_on_the_cpu(tmp_path, pipeline, capsys):
    report = tmp_path / "pipeline.json"
    table = tmp_path / "pipeline.md"
    args = ["--device", "cpu", "--tiny", "--reps", "1", "--workdir", str(tmp_path), "--json", str(report)]
    assert pipeline.main([*args, "--out", str(table)]) == 0
    found = json.loads(report.read_text())
    assert set(found["methods"]) == {"ties", "task_arithmetic"}
    assert set(found["page_cache_gbs"]) == {"cat", "dd", "python"}
    for method in found["methods"].values():
        assert method["verdict"] == "bit-identical" and method["against_cpu"]["tensors"] > 0
        assert method["gbs"] > 0 and method["ratio"] > 0 and len(method["seconds"]) == 1
    assert "| ties | cpu |" in table.read_text() and "| task_arithmetic | cpu |" in capsys.readouterr().out


def test_the_comparison_tells_kept_entries_from_other_differences(tmp_path, pipeline):
    import torch
    from safetensors.torch import save_file

    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    for name, values in {
        "a": [1.0, 2.5, 3.0, 4.0],
        "b": [1.0, 2.5001, 3.0, 4.0],
        "c": [1.5, 2.5, 3.0, 4.0],
    }.items():
        (tmp_path / name).mkdir()
        save_file({"w": torch.tensor(values)}, tmp_path / name / "model.safetensors")
    same = pipeline.compare(tmp_path / "a", tmp_path / "a", base)
    assert pipeline.verdict("ties", same) == "bit-identical"
    close = pipeline.compare(tmp_path / "b", tmp_path / "a", base)
    assert close["entries_differing"] == 1 and not close["kept_differs"]
    assert pipeline.verdict("ties", close).startswith("same kept entries")
    assert pipeline.verdict("task_arithmetic", close).startswith("DIFFERS")
    kept = pipeline.compare(tmp_path / "c", tmp_path / "a", base)
    assert kept["kept_differs"] == 1 and pipeline.verdict("ties", kept).startswith("DIFFERS")


@pytest.mark.slow
def test_the_whole_gpu_check_runs_dry_on_the_cpu(tmp_path):
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    done = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    steps = (tmp_path / "out" / "steps.txt").read_text()
    assert "pipeline rc=0" in steps and "done" in steps
    assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["methods"]
