"""Integrity of RI cache entries: every entry carries a manifest of its files' sizes and sha256,
written before the entry is published and checked whenever it is found, so a tampered or
truncated entry is retrained instead of being merged (or failing every merge from then on).

The manifest guards against damage (a full disk, a crash, an edited file), not against someone
who can also rewrite the manifest: the cache is trusted as much as the folder it lives in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from ..io.manifest import file_sha256

MANIFEST = "ri-manifest.json"
MANIFEST_VERSION = 1


def entry_files(folder: Path) -> dict[str, Path]:
    """Every file of an entry but the manifest, by path relative to the entry."""
    files = (p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    named = {p.relative_to(folder).as_posix(): p for p in files}
    named.pop(MANIFEST, None)
    return named


def write_manifest(folder: Path) -> None:
    """Record each file's size and sha256 in the (unpublished) entry; call last, before the rename."""
    files = {
        name: {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for name, path in sorted(entry_files(folder).items())
    }
    text = json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1, sort_keys=True) + "\n"
    (folder / MANIFEST).write_text(text)


def _read_manifest(folder: Path) -> dict[str, dict] | str:
    """The manifest's file table, or why there is none to trust."""
    path = folder / MANIFEST
    if not path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("version") != MANIFEST_VERSION or not all(
            isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str) for v in files.values()
        ):
            return "unreadable manifest"
        return files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "unreadable manifest"


def entry_problem(folder: Path) -> str | None:
    """Why `folder` is not a usable cache entry ("missing" when absent), or None when every file is
    there with the recorded size and sha256. Sizes are compared before any byte is hashed."""
    if not folder.is_dir():
        return "missing"
    listed = _read_manifest(folder)
    if isinstance(listed, str):
        return listed
    present = entry_files(folder)
    if "config.json" not in listed:
        return "no config.json"
    if set(present) != set(listed):
        odd = sorted(set(present) ^ set(listed))
        return f"files differ from its manifest (e.g. {odd[0]})"
    for name, path in sorted(present.items()):
        if path.is_symlink() or path.stat().st_size != listed[name]["size"]:
            return f"{name} has the wrong size"
    for name, path in sorted(present.items()):
        if file_sha256(path) != listed[name]["sha256"]:
            return f"{name} does not match its sha256"
    return None


def discard(folder: Path) -> None:
    """Remove an entry atomically for readers (renamed aside, then deleted); hold its lock."""
    if not folder.exists() and not folder.is_symlink():
        return
    aside = folder.parent / f".{folder.name}.bad-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, aside)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def warn_bad_entry(folder: Path, problem: str) -> None:
    """One line on stderr: the merge goes on, retraining the entry."""
    print(
        f"warning: RI cache entry {folder} is damaged ({problem}); discarding it and adapting again",
        file=sys.stderr,
        flush=True,
    )
