"""The output folder's life cycle: refuse bad targets, stage in a hidden folder, rename at the end.

A merge writes into `.<name>.ri-merge-partial-<pid>` beside the target and renames it into place
only when everything is written, so a failed or killed merge never leaves a folder that looks
like a finished checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError


def check_target(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse an output inside (or equal to) an input, and a non-empty one without --force."""
    target = out.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if target == folder or folder in target.parents:
            raise UserError(f"output {out} is inside input {folder}; inputs are never modified, choose another folder")
        if target in folder.parents:
            raise UserError(f"output {out} contains input {folder}; --force would delete it, choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output folder {out} exists and is not empty; pass --force to replace it")


def make_staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.ri-merge-partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder to `out`, replacing what --force allowed us to replace."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.ri-merge-old-{os.getpid()}"
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
