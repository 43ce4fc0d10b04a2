"""Stage caching: a stage's output is reused while the inputs that decided it are unchanged.

Each stage writes its output, then a `.fingerprint` file holding the JSON of its inputs (the
slice of the configuration it depends on, and the fingerprints of the stages it reads). A later
run rebuilds a stage only when that JSON differs, so changing the expert schedule retrains the
experts but not the base, and adding a merge method costs only its merges and evaluations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARK = ".fingerprint"


def canonical(value: Any) -> str:
    """Stable JSON of configs made of dataclasses, tuples and plain values."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return json.dumps(plain(value), sort_keys=True)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()[:16]


def is_fresh(folder: Path, inputs: Any) -> bool:
    mark = folder / MARK
    return mark.exists() and mark.read_text() == canonical(inputs)


def mark_done(folder: Path, inputs: Any) -> None:
    (folder / MARK).write_text(canonical(inputs))


def stage(folder: Path, inputs: Any, build: Callable[[Path], None], rebuild: bool = False) -> bool:
    """Run `build(folder)` unless `folder` already holds the output for `inputs`. Returns whether
    it built. A half-built folder (no mark: the run was interrupted) is cleared first."""
    if not rebuild and is_fresh(folder, inputs):
        return False
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    build(folder)
    mark_done(folder, inputs)
    return True
