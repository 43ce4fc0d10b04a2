"""The output folder's life cycle: refuse bad targets, lock, stage in a hidden folder, rename.

A merge writes into `.<name>.ri-merge-partial-<pid>` beside the target and renames it into place
only when everything is written, so a failed or killed merge never leaves a folder that looks
like a finished checkpoint. A lock file beside the target keeps two merges from writing the same
output; staging folders of processes that died (SIGKILL, power loss) or that were stopped with
finished work kept for --resume (Ctrl-C, SIGTERM) are removed by the next merge into the same
output, or adopted by the next `--resume`. Inputs are compared by their real paths, so a symlinked shard (the
Hub cache's `snapshots/ → blobs/`) protects the file it points at.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError

SPACE_MARGIN = 16 * 2**20  # headers, index, config, card: a little on top of the weights
STOPPED = ".ri-merge-stopped"  # in a staging folder its merge left for --resume (its process may live on)


def hidden_name(out: Path, kind: str, pid: int | None = None) -> str:
    """`.NAME.ri-merge-KIND[-PID]` beside the output, short enough for any file system even when
    NAME itself is near the 255-byte limit."""
    name = out.name
    if len(name.encode()) > 180:
        name = (
            name.encode()[:150].decode(errors="ignore")
            + "-"
            + hashlib.sha256(out.name.encode()).hexdigest()[:12]
        )
    return f".{name}.ri-merge-{kind}" + (f"-{pid}" if pid is not None else "")


def check_target(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse an output that is, contains or lies inside any input (compared by real paths), and
    a non-empty one without --force."""
    try:
        _check_target(out, inputs, force)
    except OSError as exc:  # a name too long, a parent that cannot be listed, ...
        raise output_error(exc, out, None, 0) from None


def _check_target(out: Path, inputs: Iterable[Path], force: bool) -> None:
    target = Path(os.path.realpath(out))
    for path in inputs:
        real = Path(os.path.realpath(path))
        if real == target:
            raise UserError(f"output {out} is input {path}; inputs are never modified, choose another folder")
        if target in real.parents:
            raise UserError(
                f"output {out} contains input {path}; --force would delete it, choose another folder"
            )
        if real in target.parents:
            raise UserError(
                f"output {out} is inside input {real}; inputs are never modified, choose another folder"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output folder {out} exists and is not empty; pass --force to replace it")


def check_space(out: Path, needed: int) -> None:
    """Refuse up front a merge that cannot fit on the output's file system."""
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        return
    if free < needed + SPACE_MARGIN:
        raise UserError(
            f"not enough disk space for {out}: the merge writes {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free in {out.parent}"
        )


class OutputLock:
    """An exclusive lock on one output path, held from the checks to the final rename."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / hidden_name(out, "lock")
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="ignore").strip() or "?"
                os.close(fd)
                raise UserError(
                    f"another ri-merge (pid {holder}) is writing {self.out}; wait for it "
                    "or choose another folder"
                ) from None
            try:  # the previous holder may have removed the file between our open and lock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def abandoned(staging: Path, pid: int) -> bool:
    """A staging folder no merge is writing: its process is gone (or is this one, which holds the
    output's lock), or its merge stopped and left it for --resume (an API caller's interrupted
    merge, whose process lives on)."""
    return pid == os.getpid() or not _alive(pid) or (staging / STOPPED).exists()


def mark_stopped(staging: Path) -> None:
    """Leave `staging` for --resume: any later merge into the output may adopt or remove it."""
    try:
        (staging / STOPPED).touch()
    except OSError:  # then it is left to its process's end, as a killed merge's is
        pass


def clean_stale(out: Path, keep: Path | None = None) -> list[str]:
    """Remove staging folders left beside `out` by merges whose process is gone (call it holding
    the output's lock), but `keep` (the one a resumed merge adopted); one line per folder removed."""
    pattern = re.compile(re.escape(hidden_name(out, "")) + r"(partial|old)-(\d+)$")
    notes = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return notes
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not abandoned(entry, int(match.group(2))):
            continue
        if keep is not None and entry == keep:
            continue
        size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file() and not p.is_symlink())
        why = "stopped, kept for --resume" if (entry / STOPPED).exists() else "is gone"
        shutil.rmtree(entry, ignore_errors=True)
        notes.append(
            f"removed {entry.name} ({size / 1e9:.2f} GB), left by an interrupted merge "
            f"(process {match.group(2)} {why})"
        )
    return notes


def make_staging(out: Path) -> Path:
    staging = out.parent / hidden_name(out, "partial", os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished staging folder to `out`, replacing what --force allowed us to replace;
    a folder that appeared at `out` during the merge is never replaced without --force."""
    old = None
    if out.exists() or out.is_symlink():
        if not force and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"output {out} appeared while merging; not replaced (pass --force to replace it)")
        old = out.parent / hidden_name(out, "old", os.getpid())
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def output_error(exc: OSError, out: Path, staging: Path | None, needed: int) -> UserError:
    """A failure to write the output as one line that names `out` (not the hidden staging folder)
    and, for a full disk, the space the merge needs."""
    where = str(exc.filename or out)
    if staging is not None:
        where = where.replace(str(staging), str(out))
    if exc.errno == errno.ENOSPC:
        return UserError(
            f"no space left on the device writing {out}: the merge needs {needed / 1e9:.2f} GB "
            f"in {out.parent}"
        )
    if exc.errno == errno.ENAMETOOLONG:
        return UserError(f"cannot write output {out}: file name too long")
    return UserError(f"cannot write output {out} ({where}): {exc.strerror or exc}")
