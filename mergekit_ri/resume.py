"""Resuming an interrupted merge: the staging folder's journal of finished work units.

Every merge keeps, inside its staging folder, a journal (`.ri-merge-units.jsonl`): a first line
with what the output is made from (ri-merge's version, the device kind, the recipe, every input
file's size and modification time, the plan's layout), then one line per finished unit with the
sha256 of its bytes. A merge killed before it publishes (SIGKILL, a crash, a lost machine)
leaves that folder behind, and so does one stopped by Ctrl-C or SIGTERM once a unit is finished;
`--resume` adopts it, refuses it if anything it was made from has changed, re-hashes every
recorded unit from the shard files, and computes only the units missing or whose bytes do not
match. The journal is removed before the output is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ResumableError, UserError
from .io.output import STOPPED, abandoned, hidden_name
from .io.sources import TensorRef
from .io.writer import shard_headers, shard_is_whole
from .plan import MergePlan
from .units import OutputUnit, file_digest

JOURNAL = ".ri-merge-units.jsonl"
FORMAT = 1


def _stable(value: object) -> object:
    """A value as the digest sees it: the same in every process and on every node. Paths are left
    out (a node may see the inputs elsewhere); arrays by a hash of their bytes; dataclasses by
    their public fields; anything else by its type's name (a lock, a cache)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return "path"
    if is_dataclass(value) and not isinstance(value, type):
        return (
            type(value).__name__,
            tuple(
                (f.name, _stable(getattr(value, f.name)))
                for f in fields(value)
                if not f.name.startswith("_") and f.name != "path"
            ),
        )
    if isinstance(value, dict):
        return tuple(sorted((str(k), _stable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_stable(v) for v in value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return (str(data.dtype), data.shape, hashlib.sha256(data.tobytes()).hexdigest())
    return type(value).__name__


def _ref_paths(value: object) -> set[Path]:
    """Every file a tensor is read from (a LoRA'd tensor: the base's and the adapter's; a
    re-laid vocabulary tensor: every model's)."""
    if isinstance(value, TensorRef):
        paths = {value.path}
        for item in fields(value):
            paths |= _ref_paths(getattr(value, item.name)) if item.name != "path" else set()
        return paths
    if is_dataclass(value) and not isinstance(value, type):
        return set().union(
            *(_ref_paths(getattr(value, f.name)) for f in fields(value) if not f.name.startswith("_"))
        )
    if isinstance(value, dict):
        return set().union(*(_ref_paths(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*(_ref_paths(v) for v in value))
    return set()


def layout_digest(plan: MergePlan) -> str:
    """The output's layout and what each tensor is made of, without any path: equal on every
    machine that sees the same inputs (a distributed worker checks its own plan against it)."""
    digest = hashlib.sha256(f"{plan.method.name}\n".encode())
    for model in ([plan.base] if plan.base else []) + plan.experts:
        digest.update(f"{model.label}:{model.fingerprint}\n".encode())
    for task in plan.tasks:
        refs = [_stable(r) for r in (task.base, *task.experts)]
        digest.update(
            repr(
                (
                    task.name,
                    task.shape,
                    task.out_dtype,
                    task.shard,
                    task.offset,
                    task.merge,
                    task.params,
                    refs,
                )
            ).encode()
        )
    return digest.hexdigest()


def _recipe_fields(plan: MergePlan) -> dict[str, Any]:
    """The recipe as far as it decides the output's bytes: not how the merge runs (where, in how
    much memory), which a resume may change."""
    running = {"distributed", "max_memory", "device"} & set(type(plan.recipe).model_fields)
    return plan.recipe.model_dump(mode="json", exclude_defaults=True, exclude=running)


def fingerprint(plan: MergePlan, device: str) -> dict[str, Any]:
    """What a merge's bytes depend on, as the journal's first line records it."""
    from . import __version__

    inputs = {}
    for model in ([plan.base] if plan.base else []) + plan.experts:
        files = {p for ref in model.tensors.values() for p in _ref_paths(ref)} | set(model.extra_files)
        for path in sorted(p for p in files if not p.is_dir()):
            try:
                info = path.stat()
                inputs[str(path)] = f"{info.st_size}:{info.st_mtime_ns}"
            except OSError:
                inputs[str(path)] = "missing"
    return {
        "format": FORMAT,
        "ri_merge": __version__,
        "device": device,
        "recipe": hashlib.sha256(json.dumps(_recipe_fields(plan), sort_keys=True).encode()).hexdigest(),
        "layout": layout_digest(plan),
        "inputs": inputs,
    }


def _difference(recorded: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, in a few words; None when they are the same."""
    if recorded.get("format") != now["format"] or recorded.get("ri_merge") != now["ri_merge"]:
        return f"it was started by ri-merge {recorded.get('ri_merge', '?')}, this is {now['ri_merge']}"
    if recorded.get("recipe") != now["recipe"]:
        return "the recipe differs"
    if recorded.get("device") != now["device"]:
        return f"it ran on {recorded.get('device')}, this merge runs on {now['device']}"
    before, after = recorded.get("inputs") or {}, now["inputs"]
    for path in sorted(set(before) | set(after)):
        if before.get(path) != after.get(path):
            what = "is not an input any more" if path not in after else "changed"
            what = "is a new input" if path not in before else what
            return f"input {path} {what}"
    if recorded.get("layout") != now["layout"]:
        return "the inputs' headers differ"
    return None


@dataclass
class Journal:
    """The journal of one staging folder: which units are finished (verified) and the warnings
    recorded with them; `record` appends a finished unit (thread-safe)."""

    path: Path
    done: dict[int, str] = field(default_factory=dict)  # unit index → sha256, verified
    warnings: list[str] = field(default_factory=list)
    kept: tuple[int, ...] = ()  # units found finished when the merge started
    inputs: dict[int, list[str | None]] = field(default_factory=dict)  # unit → its inputs' sha256
    _file: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def begin(
        cls,
        staging: Path,
        out: Path,
        plan: MergePlan,
        units: list[OutputUnit],
        stamp: dict[str, Any],
        resume: bool,
    ) -> Journal:
        """A fresh journal; with `resume`, first the finished units of the one already there."""
        journal = cls(staging / JOURNAL)
        records: list[dict[str, Any]] = []
        if resume and journal.path.is_file():
            records = _verified(staging, out, plan, units, stamp, journal.path)
        journal.done = {r["unit"]: r["sha256"] for r in records}
        journal.kept = tuple(sorted(journal.done))
        journal.inputs = {r["unit"]: r["inputs"] for r in records if isinstance(r.get("inputs"), list)}
        journal.warnings = list(dict.fromkeys(w for r in records for w in r.get("warnings", ())))
        temporary = journal.path.with_name(JOURNAL + ".new")
        with open(temporary, "w") as f:
            f.write(json.dumps({"fingerprint": stamp}) + "\n")
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(temporary, journal.path)
        journal._file = open(journal.path, "a")
        return journal

    def record(
        self,
        unit: OutputUnit,
        sha256: str,
        plan: MergePlan,
        warnings: list[str] = (),
        inputs: list[str | None] | None = None,
    ) -> None:
        """A finished unit: its bytes' sha256, the warnings found computing it, and the sha256 of
        each input it read (`units.input_digests`), for the card's content fingerprints."""
        line = {
            "unit": unit.index,
            "shard": plan.shards[unit.shard].filename,
            "start": unit.start,
            "end": unit.end,
            "sha256": sha256,
            "warnings": list(warnings),
        }
        if inputs is not None:
            line["inputs"] = inputs
        with self._lock:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()  # in the kernel's page cache: a killed process loses nothing
            self.done[unit.index] = sha256  # after the line: `done` never counts one not on disk
            if inputs is not None:
                self.inputs[unit.index] = inputs

    def finish(self) -> None:
        """The merge is whole: the journal goes (it must not be published with the output)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def journaled(staging: Path, journal: Journal | None) -> int:
    """How many finished units a --resume would find in `staging`: 0 once the journal is gone
    (the merge was about to publish). Without a `journal` (stopped while a resume was still
    verifying the last one), the units its file records."""
    path = staging / JOURNAL
    if not path.is_file():
        return 0
    if journal is not None:
        return len(journal.done)
    try:
        lines = path.read_text(errors="replace").splitlines()[1:]
    except OSError:
        return 0
    units = set()
    for line in lines:
        try:
            units.add(json.loads(line)["unit"])
        except (ValueError, KeyError, TypeError):  # a torn last line
            continue
    return len(units)


def _verified(
    staging: Path,
    out: Path,
    plan: MergePlan,
    units: list[OutputUnit],
    stamp: dict[str, Any],
    path: Path,
) -> list[dict[str, Any]]:
    """The journal's finished units whose bytes are still what was recorded; refuses a journal
    made from another recipe, other inputs or another ri-merge."""
    lines = path.read_text(errors="replace").splitlines()
    try:
        recorded = json.loads(lines[0])["fingerprint"]
    except (IndexError, ValueError, KeyError, TypeError):
        raise UserError(
            f"cannot resume {out}: the interrupted merge's journal is unreadable; rerun without --resume"
        ) from None
    why = _difference(recorded, stamp)
    if why is not None:  # the interrupted merge's folder stays, for a resume with what it was made from
        raise ResumableError(
            f"cannot resume {out}: {why} since the interrupted merge; rerun without --resume to start over"
        )
    by_key = {(plan.shards[u.shard].filename, u.start, u.end): u for u in units}
    heads = shard_headers(plan.shard_layouts())
    whole = {
        s.filename: shard_is_whole(staging / s.filename, head, s.data_bytes)
        for s, head in zip(plan.shards, heads)
    }
    candidates: dict[int, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
            unit = by_key.get((record["shard"], record["start"], record["end"]))
        except (ValueError, KeyError, TypeError):  # the line being written when the process died
            continue
        if unit is not None and whole.get(record["shard"]) and isinstance(record.get("sha256"), str):
            candidates[unit.index] = {**record, "unit": unit.index}

    def matches(record: dict[str, Any]) -> bool:
        return file_digest(staging / record["shard"], record["start"], record["end"]) == record["sha256"]

    with ThreadPoolExecutor(2, "ri-verify") as pool:  # hashlib lets go of the GIL on big reads
        checks = list(pool.map(matches, candidates.values()))
    return [record for record, ok in zip(candidates.values(), checks) if ok]


def adopt_staging(out: Path) -> Path | None:
    """With --resume (holding the output's lock): the most recent staging folder an interrupted
    merge left beside `out` with a journal in it, renamed to be this process's; None if none."""
    pattern = re.compile(re.escape(hidden_name(out, "")) + r"partial-(\d+)$")
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return None
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not abandoned(entry, int(match.group(1))):
            continue
        journal = entry / JOURNAL
        if journal.is_file():
            found.append((journal.stat().st_mtime_ns, entry))
    if not found:
        return None
    _, chosen = max(found)
    mine = out.parent / hidden_name(out, "partial", os.getpid())
    if chosen != mine:
        os.rename(chosen, mine)
    (mine / STOPPED).unlink(missing_ok=True)  # this merge's now: never published with the output
    return mine
