"""Where the scripts find (and, on request, install) mergekit: its own venv, never this one.

mergekit pins its own versions of transformers, accelerate, pydantic, ... so it lives in a
separate virtual environment (default /work/mk-venv). `bench_speed.py` only looks for it;
`parity_mergekit.py` creates it when missing:

    python -m venv /work/mk-venv
    /work/mk-venv/bin/pip install torch==2.13.0     # CPU wheel first: no multi-GB CUDA build
    /work/mk-venv/bin/pip install mergekit==0.1.5
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("MERGEKIT_VENV", "/work/mk-venv"))
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"


def venv_tool(venv: Path, name: str) -> Path:
    """Path of an executable installed in a venv (bin/ on POSIX)."""
    return venv / "bin" / name


def find_mergekit(requested: str | None = None, venv: Path = DEFAULT_VENV) -> str | None:
    """The mergekit-yaml to use: `requested`, the venv's, the one on PATH, or None."""
    if requested:
        return requested
    default = venv_tool(venv, "mergekit-yaml")
    if default.exists():
        return str(default)
    return shutil.which("mergekit-yaml")


def sibling_tool(mergekit_yaml: str, name: str) -> str | None:
    """Another mergekit entry point (mergekit-multi, python) beside a mergekit-yaml."""
    path = Path(mergekit_yaml).parent / name
    return str(path) if path.exists() else shutil.which(name)


def installed_version(venv: Path = DEFAULT_VENV) -> str | None:
    """mergekit's version in the venv, or None when it is not importable there."""
    python = venv_tool(venv, "python")
    if not python.exists():
        return None
    proc = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_mergekit(venv: Path = DEFAULT_VENV, version: str = MERGEKIT_VERSION, log=sys.stderr) -> str:
    """Create the venv and install mergekit `version` there unless it is already present.

    Returns the path of its mergekit-yaml. Raises RuntimeError with pip's last lines when the
    install fails, and warns (on `log`) when `pip check` reports a dependency conflict.
    """
    have = installed_version(venv)
    if have == version:
        return str(venv_tool(venv, "mergekit-yaml"))
    print(f"installing mergekit {version} into {venv} (one-time, a few minutes) ...", file=log, flush=True)
    steps = []
    if not venv_tool(venv, "python").exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    pip = str(venv_tool(venv, "pip"))
    steps += [
        [pip, "install", "-q", f"torch=={TORCH_VERSION}"],
        [pip, "install", "-q", f"mergekit=={version}"],
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(step)} failed:\n{tail}")
    check = subprocess.run([pip, "check"], capture_output=True, text=True)
    if check.returncode:
        print(f"warning: pip check in {venv}:\n{check.stdout.strip()}", file=log)
    return str(venv_tool(venv, "mergekit-yaml"))
