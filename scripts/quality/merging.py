"""Merges through ri-merge's public interfaces: which methods exist, their recipes, the λ grid.

`ri-merge methods --json` says what exists (so methods added later are picked up without touching
this file); the recipes are validated with `mergekit_ri.plan` and merged with `mergekit_ri.merge`,
the Python API a pipeline would call: the same code as the command, without a Python and torch
start-up for each of the ~150 merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCALE_PARAMETERS = ("lambda", "alpha")  # the final scale of the merged task vector, by name
CHOICE_PARAMETERS = ("solver",)  # parameters whose every choice gets its own row


def ri_merge_command() -> list[str]:
    """`ri-merge` as installed beside this Python (falls back to the module)."""
    script = shutil.which("ri-merge")
    return [script] if script else [sys.executable, "-c", "from mergekit_ri.cli import entry; entry()"]


def cli_env(threads: int = 1) -> dict[str, str]:
    """The environment of a merge: one thread per merge, since two run side by side."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def list_methods() -> dict[str, dict[str, Any]]:
    """`ri-merge methods --json`: every method with its parameters, defaults and choices."""
    out = subprocess.run(
        [*ri_merge_command(), "methods", "--json"], check=True, capture_output=True, text=True, env=cli_env()
    )
    return json.loads(out.stdout)


def tool_fingerprint() -> str:
    """A hash of the mergekit_ri sources: cached merge results are reused only while the tool
    that produced them is unchanged (another engineer fixing a method invalidates them)."""
    import mergekit_ri

    root = Path(mergekit_ri.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- what gets merged


@dataclass(frozen=True)
class Variant:
    """One row family of the table: a method with some parameters pinned (e.g. a WUDI solver)."""

    method: str
    fixed: tuple[tuple[str, Any], ...] = ()
    scale: str | None = None  # "lambda" or "alpha": the parameter the validation grid tunes
    scale_default: float | None = None

    @property
    def name(self) -> str:
        pinned = ", ".join(f"{k}={v}" for k, v in self.fixed)
        return f"{self.method} ({pinned})" if pinned else self.method


def variants(methods: dict[str, dict[str, Any]], only: list[str] | None = None) -> list[Variant]:
    """Every method that needs a base (task vectors), one variant per choice of its `solver`-like
    parameters; `only` keeps the named methods, in that order."""
    names = [m for m in methods if methods[m].get("needs_base")]
    if only:
        missing = [m for m in only if m not in methods]
        if missing:
            raise SystemExit(f"unknown method(s) {missing}; ri-merge has: {', '.join(methods)}")
        names = [m for m in only if m in names]
    out: list[Variant] = []
    for name in names:
        params = {p["name"]: p for p in methods[name].get("parameters", [])}
        scale = next((s for s in SCALE_PARAMETERS if s in params), None)
        scale_default = float(params[scale]["default"]) if scale else None
        choices = [(p, params[p]["choices"]) for p in CHOICE_PARAMETERS if params.get(p, {}).get("choices")]
        if not choices:
            out.append(Variant(name, (), scale, scale_default))
            continue
        param, values = choices[0]
        out.extend(Variant(name, ((param, value),), scale, scale_default) for value in values)
    return out


@dataclass(frozen=True)
class MergeJob:
    """One merge to run and evaluate: a variant at one scale (None: the method's defaults)."""

    variant: Variant
    scale_value: float | None
    ri: tuple[tuple[str, Any], ...] | None = None  # the resolve_interference section, as items

    @property
    def label(self) -> str:
        prefix = "RI + " if self.ri else ""
        return f"{prefix}{self.variant.name}"


# The papers' densities, pinned: ri-merge's defaults are mergekit's (density 1: no trimming or
# dropping), which would make these rows task arithmetic. The table's figures use these values.
PAPER_PARAMETERS: dict[str, dict[str, Any]] = {
    "ties": {"density": 0.2},
    "dare_linear": {"density": 0.2},
    "dare_ties": {"density": 0.2},
}


def recipe(job: MergeJob, base: Path, experts: list[Path], seed: int) -> dict[str, Any]:
    """The YAML recipe of a job, as a user would write it for classifier experts."""
    params: dict[str, Any] = {**PAPER_PARAMETERS.get(job.variant.method, {}), **dict(job.variant.fixed)}
    if job.scale_value is not None and job.variant.scale:
        params[job.variant.scale] = job.scale_value
    fields: dict[str, Any] = {
        "merge_method": job.variant.method,
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "heads": "auto",
        "out_dtype": "float32",
        "seed": seed,
    }
    if params:
        fields["parameters"] = params
    if job.ri:
        fields["resolve_interference"] = dict(job.ri)
    return fields


def job_key(fields: dict[str, Any], extra: dict[str, Any]) -> str:
    """Cache key of a job's result: its recipe plus what else decides the numbers."""
    blob = json.dumps({"recipe": fields, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class MergeOutcome:
    ok: bool
    seconds: float
    error: str = ""
    files: list[str] = field(default_factory=list)  # what the merge wrote, relative to its folder


def merge_recipe(recipe_path: Path, out: Path, env_extra: dict[str, str] | None = None) -> MergeOutcome:
    """`mergekit_ri.merge(recipe, out)` (replacing `out`). On failure, the one-line error the
    command would print ("error: ..." for bad input); anything else is a bug, reported the same way."""
    import time

    import mergekit_ri

    os.environ.update(env_extra or {})
    start = time.perf_counter()
    try:
        options = mergekit_ri.MergeOptions(force=True, checksums=False)
        result = mergekit_ri.merge(recipe_path, out, options=options)
    except mergekit_ri.UserError as exc:
        return MergeOutcome(False, time.perf_counter() - start, f"error: {exc}")
    except Exception as exc:  # a bug in ri-merge: keep the benchmark going, with the reason in its row
        return MergeOutcome(False, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    return MergeOutcome(True, time.perf_counter() - start, files=[f.name for f in result.files])


def validate(recipe_path: Path) -> tuple[bool, str]:
    """`mergekit_ri.plan(recipe)`: reads headers only — whether the tool accepts the recipe."""
    import mergekit_ri

    try:
        report = mergekit_ri.plan(recipe_path)
    except mergekit_ri.UserError as exc:
        return False, f"error: {exc}"
    plan = report.plan
    return True, f"{recipe_path}: valid — {len(plan.tasks)} tensors from {len(plan.experts)} model(s)"


def write_recipe(path: Path, fields: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path
